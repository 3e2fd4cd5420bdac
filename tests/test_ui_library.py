"""The app's library and engine without a server: adapter folders holding what people's folders hold (malformed
files, decompression bombs, NaN sidecars), nonsense settings, concurrent exports, and uploads (checked, never
overwriting each other, never half-listed, cleaned up after a crash)."""

from __future__ import annotations

import base64
import os
import struct
import sys
import threading
import time
import zlib
from dataclasses import replace

import pytest
import torch
from helpers import random_adapter
from safetensors.torch import save_file

import sd_lora

pytest.importorskip("gradio")
from test_ui import write_library

from ui import catalog


# ---- the engine against odd libraries, odd values and concurrent requests ------------------------------------------
def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width`x`height` pixels: what a decompression bomb looks like to PIL."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def odd_studio(tmp_path_factory):
    """A Studio whose library holds, beside the usual files, what people's folders also hold: a file whose alpha is
    not one number, adapters whose thumbnail or preview is a decompression bomb, and a NaN preferred weight."""
    from ui.engine import Studio

    base = tmp_path_factory.mktemp("odd")
    library = base / "adapters"
    write_library(library)
    pipe = sd_lora.load_pipeline("tiny")
    stem = "lora_unet_mid_block_attentions_0_proj_in"
    save_file({f"{stem}.lora_down.weight": torch.ones(2, 64, 1, 1), f"{stem}.lora_up.weight": torch.ones(64, 2, 1, 1),
               f"{stem}.alpha": torch.ones(2)}, library / "alphas.safetensors")
    bomb = _png_claiming(30000, 30000)
    sd_lora.save_adapter(random_adapter(pipe, seed=7), library / "thumbbomb.safetensors",
                         metadata={"modelspec.thumbnail": "data:image/png;base64," + base64.b64encode(bomb).decode()})
    sd_lora.save_adapter(random_adapter(pipe, seed=8), library / "previewbomb.safetensors")
    (library / "previewbomb.preview.png").write_bytes(bomb)
    (library / "previewbomb.json").write_text('{"preferred weight": NaN}')
    return Studio("tiny", [library], base / "outputs")


def test_odd_files_in_the_library_never_stop_the_app(odd_studio):
    """Each of these files used to raise out of Studio() at startup (or out of a rescan): the app never came up."""
    entries = odd_studio.entries
    assert not entries["alphas"].usable and "alpha must be one number" in entries["alphas"].error
    for name in ("thumbbomb", "previewbomb"):  # usable, just without a preview
        assert entries[name].usable and entries[name].preview is None
    assert entries["previewbomb"].weight == 1.0  # not NaN, which the slider would get as null
    assert entries["ink"].preview is not None and entries["ink"].weight == 0.6


def test_nan_settings_tags_and_sweep_ranges_are_refused(odd_studio):
    """NaN passed every range test: a NaN CFG scale ran without guidance, NaN weights made black images."""
    from ui.engine import Settings

    s = Settings("a red circle", steps=2, seed=1, width=64, height=64)
    weights = odd_studio.parse_weights("{}")
    for label, bad in (("CFG scale", replace(s, guidance=float("nan"))), ("steps", replace(s, steps="many")),
                       ("seed", replace(s, seed=float("nan")))):
        with pytest.raises(ValueError, match=f"{label} must be a number"):
            odd_studio.generate(bad, weights)
    for tag in ("<lora:mozart:nan>", "<lora:mozart:1:inf>"):
        with pytest.raises(ValueError, match="must be finite numbers"):
            odd_studio.generate(replace(s, prompt=f"a red circle {tag}"), weights)
    with pytest.raises(ValueError, match="ranges must be finite"):
        odd_studio.sweep(s, weights, "mozart", (float("nan"), 1.0), "seed")
    result = odd_studio.generate(replace(s, guidance=float("inf")), weights)  # infinite is only out of range
    assert "CFG scale inf is out of range (0–30); using 30" in result.notes


def test_concurrent_exports_under_one_name_never_share_a_file(odd_studio):
    """Both requests used to pick the same free name and write it in turn: one user downloaded the other's blend."""
    paths, barrier = {}, threading.Barrier(2)

    def export(weight):
        weights = odd_studio.parse_weights({"mozart": weight})
        barrier.wait()
        paths[weight] = odd_studio.export_blend(weights, "same").images[0][0]

    threads = [threading.Thread(target=export, args=(w,)) for w in (0.5, -0.5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(set(paths.values())) == 2
    for weight, path in paths.items():  # each file holds its own request's blend: the sign of the weight shows
        up = sd_lora.read_adapter(path).modules
        mozart = odd_studio.lora.export("mozart").modules
        name = next(iter(mozart))
        assert torch.sign(up[name].up.float().sum()) == torch.sign(weight * mozart[name].up.sum())


def test_a_file_already_in_the_library_is_not_added_twice(odd_studio):
    """An upload stored while another user rescans reaches add() twice; it used to become two adapters."""
    before = dict(odd_studio.entries)
    again = odd_studio.add(odd_studio.entries["mozart"].path)
    assert again is before["mozart"] and odd_studio.entries == before and odd_studio.rescan() == []


# ---- uploads ----------------------------------------------------------------------------------------------------
def test_uploads_are_checked_before_they_reach_the_library(tmp_path):
    pipe = sd_lora.load_pipeline("tiny")
    good = tmp_path / "upload.bin"
    sd_lora.save_adapter(random_adapter(pipe, seed=5), good)
    library = tmp_path / "adapters"
    stored = catalog.store_upload(good, library, "my style.safetensors", max_bytes=10 << 20)
    assert stored.name == "my_style.safetensors" and sd_lora.read_adapter(stored).ranks == {4}
    assert catalog.store_upload(good, library, "my style.safetensors", 10 << 20).name == "my_style-2.safetensors"
    for name, limit, message in (("evil.ckpt", 10 << 20, "only .safetensors"), ("big.safetensors", 100, "limit"),):
        with pytest.raises(sd_lora.AdapterError, match=message):
            catalog.store_upload(good, library, name, limit)
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x80\x04junk" * 10)
    with pytest.raises(sd_lora.AdapterError, match="junk.safetensors: not a safetensors file"):
        catalog.store_upload(junk, library, "junk.safetensors", 10 << 20)
    assert sorted(p.name for p in library.iterdir()) == ["my_style-2.safetensors", "my_style.safetensors"]


def test_simultaneous_uploads_under_one_name_get_their_own_files(tmp_path):
    """Each upload picked a free name, then moved its file there: two at once could pick the same name, and one
    user's adapter replaced the other's. A rescan meanwhile could list a half-copied file (a move across
    filesystems is a copy), which then stayed in the library as a broken adapter."""
    n, rounds = 16, 24
    folders = [tmp_path / "adapters" / str(r) for r in range(rounds)]
    uploads = []
    for i in range(n):  # one small adapter each, told apart by its values
        stem = "lora_unet_mid_block_attentions_0_proj_in"
        uploads.append(tmp_path / f"upload{i}")
        save_file({f"{stem}.lora_down.weight": torch.full((1, 64, 1, 1), float(i)),
                   f"{stem}.lora_up.weight": torch.ones(64, 1, 1, 1)}, uploads[-1])
    contents = {p.read_bytes(): i for i, p in enumerate(uploads)}
    listed, done = [], threading.Event()

    def rescan():  # what another user's rescan reads meanwhile: only whole adapters
        while not done.is_set():
            listed.extend(p.read_bytes() for p in catalog.scan(folders))

    def upload(i, folder, stored, barrier):
        barrier.wait()
        stored[i] = catalog.store_upload(uploads[i], folder, "same name.safetensors", 1 << 20)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so the moment between "is it free?" and "take it" is hit
    watcher = threading.Thread(target=rescan)
    watcher.start()
    try:
        for folder in folders:
            stored, barrier = {}, threading.Barrier(n)
            threads = [threading.Thread(target=upload, args=(i, folder, stored, barrier)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            assert len(set(stored.values())) == n, sorted(p.name for p in stored.values())
            assert {i: contents[p.read_bytes()] for i, p in stored.items()} == {i: i for i in range(n)}
            assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in stored.values())  # no temp
    finally:
        sys.setswitchinterval(switch)
        done.set()
        watcher.join()
    assert listed and all(data in contents for data in listed)
    (folders[0] / ".upload-abc.safetensors").write_bytes(b"half an upload")  # one still being written
    assert len(catalog.scan(folders[:1])) == n


def test_uploads_a_killed_app_left_behind_are_removed_at_startup(tmp_path):
    """An app killed mid-upload left its hidden temp file in the adapter folder for good: scans skip hidden names.
    The next start removes it, once it is old; a fresh one may be another app's upload still being copied."""
    from ui.engine import Studio

    library = tmp_path / "adapters"
    library.mkdir()
    outside = tmp_path / "elsewhere.safetensors"
    hours_ago = time.time() - 2 * 3600
    names = [".upload-1a2b.safetensors", ".upload-3c4d.safetensors", "._mozart.safetensors", ".upload-5e6f.json"]
    for path in (*(library / name for name in names), outside):
        path.write_bytes(b"half an upload")
    (library / ".upload-link.safetensors").symlink_to(outside)  # not a temp file store_upload makes: left alone
    for path in (library / names[0], library / names[2], library / names[3], outside):
        os.utime(path, (hours_ago, hours_ago))
    studio = Studio("tiny", [library], tmp_path / "outputs")
    assert sorted(p.name for p in library.iterdir()) == sorted([*names[1:], ".upload-link.safetensors"])
    assert outside.is_file() and studio.entries == {}
