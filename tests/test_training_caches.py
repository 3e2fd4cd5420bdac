"""sd_lora.training.caches: cached latents and text embeddings equal fresh encodes, a --cache-dir is reused across
runs and processes, and a bad file in it is only a miss."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sd_lora.training import caches
from sd_lora.training.buckets import assign_buckets
from sd_lora.training.caches import LatentCache, LiveLatents, TextCache, encode_text, sample_latents, tokenize
from sd_lora.training.data import scan_images

KEYS = [(0, False), (0, True), (1, False), (1, True)]
PROMPT = "an image in the style of mozart"


@pytest.fixture(scope="module")
def tiny():
    import sd_lora

    return sd_lora.load_pipeline("tiny")


@pytest.fixture
def two_images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "square.png")
    Image.fromarray(rng.integers(0, 255, (40, 90, 3), dtype=np.uint8)).save(folder / "wide.png")
    return assign_buckets(scan_images(folder, caption="a photo", warn=None), 64)


def test_the_vae_fingerprint_is_the_same_in_every_process():
    """diffusers' config holds `_use_default_values`, a list whose order follows the string hash seed: hashed as it
    is, each run (and each process of a multi-process run) got its own fingerprint and encoded everything again."""
    code = ("import sd_lora; from sd_lora.training.caches import vae_fingerprint; "
            "print(vae_fingerprint(sd_lora.load_pipeline('tiny').vae))")
    runs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONHASHSEED": seed, "HF_HUB_OFFLINE": "1"}) for seed in "12"]
    prints = [run.communicate(timeout=300)[0].split() for run in runs]
    assert [run.returncode for run in runs] == [0, 0]
    assert len(prints[0][-1]) == 16 and prints[0][-1] == prints[1][-1]


def test_cached_latents_equal_fresh_encodes(tiny, two_images, tmp_path, monkeypatch):
    keys = [(0, False), (0, True), (1, True)]
    live = LiveLatents(two_images, tiny.vae)
    ram = LatentCache(two_images, tiny.vae, flip=True)
    assert torch.equal(ram.params(keys[:2]), live.params(keys[:2]))
    assert torch.equal(ram.params(keys[2:]), live.params(keys[2:]))
    assert ram.params(keys[:1]).shape == (1, 8, 8, 8)

    disk = LatentCache(two_images, tiny.vae, flip=True, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 4
    assert not list((tmp_path / "cache").glob(".*"))  # no temporary files left
    calls = []
    monkeypatch.setattr(caches, "encode_pixels", lambda *a: calls.append(a) or torch.zeros(1))
    again = LatentCache(two_images, tiny.vae, flip=True, cache_dir=tmp_path / "cache")
    assert calls == []  # a second run reads the disk cache instead of encoding
    monkeypatch.undo()
    for key in keys:
        assert torch.equal(again.params([key]), disk.params([key]))
        assert torch.equal(again.params([key]), ram.params([key]))

    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = sample_latents(ram.params(keys[:2]), tiny.vae.config, g1)
    b = sample_latents(live.params(keys[:2]), tiny.vae.config, g2)
    assert torch.equal(a, b)
    mean = sample_latents(ram.params(keys[:1]), tiny.vae.config, sample=False)
    assert torch.allclose(mean, ram.params(keys[:1])[:, :4] * tiny.vae.config.scaling_factor)


def test_disk_cache_notices_a_changed_image(tiny, two_images, tmp_path):
    LatentCache(two_images, tiny.vae, flip=False, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 2
    Image.new("RGB", (64, 64), (9, 9, 9)).save(two_images[0].path)
    fresh = LatentCache(two_images, tiny.vae, flip=False, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 3
    assert torch.equal(fresh.params([(0, False)]), LiveLatents(two_images, tiny.vae).params([(0, False)]))
    with pytest.raises(KeyError):
        fresh.params([(0, True)])


def test_text_cache_equals_fresh_encodes(tiny):
    captions = ["mozart, a red square", PROMPT, "mozart, a red square"]
    cache = TextCache(captions, tiny.tokenizer, tiny.text_encoder)
    assert len(cache) == 2
    with torch.no_grad():
        fresh = encode_text(tiny.text_encoder, tokenize(tiny.tokenizer, [PROMPT]))
    assert torch.equal(cache([PROMPT]), fresh)
    assert cache(captions).shape == (3, tiny.tokenizer.model_max_length, 64)
    long = "mozart, " + "a very long caption " * 30
    assert caches.truncated_captions(tiny.tokenizer, [PROMPT, long, long]) == [long]


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def _garbage(path):
    path.write_bytes(b"\x00" * 7)


def _wrong_shape(path):
    from safetensors.torch import save

    path.write_bytes(save({"params": torch.zeros(1, 8, 4, 4)}))


@pytest.mark.parametrize("damage", [_truncate, _garbage, _wrong_shape])
def test_an_unreadable_cache_file_is_encoded_again_with_one_warning(tiny, two_images, tmp_path, capsys, damage):
    """A cache is only a cache: a bad file found when the cache is built, or one that turns bad during training,
    is encoded again and rewritten, with one warning line naming it, not a traceback mid-run."""
    live = LiveLatents(two_images, tiny.vae)
    first = LatentCache(two_images, tiny.vae, flip=True, cache_dir=tmp_path / "cache")
    files = sorted((tmp_path / "cache").iterdir())
    assert len(files) == 4 and capsys.readouterr().err == ""

    bad = first._files[(1, True)]
    damage(bad)
    again = LatentCache(two_images, tiny.vae, flip=True, cache_dir=tmp_path / "cache")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"warning: {bad}: unreadable latent cache file (")
    assert lines[0].endswith("); encoded again")
    assert sorted((tmp_path / "cache").iterdir()) == files  # rewritten in place, no temporary file left
    for key in KEYS:
        assert torch.equal(again.params([key]), live.params([key]))

    damage(bad)  # during training: the next read repairs it, once
    assert torch.equal(again.params([(1, True)]), live.params([(1, True)]))
    assert torch.equal(again.params([(1, True)]), live.params([(1, True)]))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: {bad}: unreadable latent cache file (")
    LatentCache(two_images, tiny.vae, flip=True, cache_dir=tmp_path / "cache")
    assert capsys.readouterr().err == ""


def test_a_cache_dir_whose_name_is_not_utf8(tiny, two_images, tmp_path, monkeypatch, capsys):
    """Linux allows any bytes in a name; safetensors' file functions need UTF-8 paths, so the cache reads and
    writes bytes."""
    cache_dir = tmp_path / os.fsdecode(b"cache\xff")
    written = LatentCache(two_images, tiny.vae, flip=True, cache_dir=cache_dir)
    assert len(os.listdir(os.fsencode(cache_dir))) == 4
    monkeypatch.setattr(caches, "encode_pixels", lambda *a: pytest.fail("encoded again"))
    again = LatentCache(two_images, tiny.vae, flip=True, cache_dir=cache_dir)
    monkeypatch.undo()
    live = LiveLatents(two_images, tiny.vae)
    for key in KEYS:
        assert torch.equal(again.params([key]), written.params([key]))
        assert torch.equal(again.params([key]), live.params([key]))
    assert capsys.readouterr().err == ""
