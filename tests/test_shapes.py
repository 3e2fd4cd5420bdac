"""The tiny world: scenes, captions, the eval split, the mozart_art style set and the pixel classifier that
judges the tiny model. If these drift, every quality number of the tiny model and of the demo's LoRA stops
meaning anything."""

import random
import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd_lora.models.make_tokenizer import WORDS
from sd_lora.training import metrics, shapes, style_art
from sd_lora.training.shapes import COLORS, SHAPES, TEMPLATES, Scene

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT / "datasets" / "mozart_art"


def _scenes(n: int, seed: int, split: str = "all") -> list[Scene]:
    rng = random.Random(seed)
    return [shapes.random_scene(rng, split=split) for _ in range(n)]


def test_same_seed_same_bytes():
    assert _scenes(20, 3) == _scenes(20, 3)
    assert _scenes(20, 3) != _scenes(20, 4)
    scene = _scenes(1, 3)[0]
    assert shapes.render(scene).tobytes() == shapes.render(scene).tobytes()
    assert (style_art.render_mozart(scene, rng=5).tobytes() == style_art.render_mozart(scene, rng=5).tobytes()
            != style_art.render_mozart(scene, rng=6).tobytes())
    assert shapes.random_scene(np.random.default_rng(1)) == shapes.random_scene(np.random.default_rng(1))


def test_render_is_antialiased_rgb_with_background_border():
    scene = Scene("circle", "red", "blue", 0.5, (0.5, 0.5))
    arr = np.asarray(shapes.render(scene, size=64))
    assert arr.shape == (64, 64, 3) and arr.dtype == np.uint8
    assert (arr[0] == shapes.PALETTE["blue"]).all()  # the border shows the background
    assert tuple(arr[32, 32]) == shapes.PALETTE["red"]
    n_colors = len({tuple(p) for p in arr.reshape(-1, 3)})
    assert n_colors > 2  # blended edge pixels: drawn at 4x and downsampled


def test_scenes_keep_object_and_background_apart_and_inside():
    for s in _scenes(500, 0):
        assert s.color != s.background and s.shape in SHAPES
        assert shapes.SIZE_RANGE[0] <= s.size <= shapes.SIZE_RANGE[1]
        for c in s.center:
            assert shapes.MARGIN - 1e-3 <= c - s.size / 2 and c + s.size / 2 <= 1 - shapes.MARGIN + 1e-3


@pytest.mark.parametrize("template", TEMPLATES)
def test_caption_parse_round_trip(template):
    for combo in shapes.combos("all"):
        text = template.format(color=combo.color, shape=combo.shape, background=combo.background,
                               a=shapes._article(combo.color), ab=shapes._article(combo.background))
        assert shapes.parse_caption(text) == combo
        assert shapes.parse_caption("mozart, " + text) == combo  # the trainer's trigger prefix


def test_caption_forms_and_unparseable_text():
    scene = Scene("star", "orange", "white", 0.4, (0.5, 0.5))
    assert shapes.caption(scene, paraphrase=False) == "an orange star on a white background"
    rng = random.Random(0)
    assert len({shapes.caption(scene, rng) for _ in range(200)}) == len(TEMPLATES)
    for text in ("a cat", "a red circle", "a circle on a blue background", ""):
        assert shapes.parse_caption(text) is None


def test_every_caption_word_is_in_the_tiny_tokenizer_vocabulary():
    vocab = set(WORDS)
    for combo in shapes.combos("all"):
        for seed in range(len(TEMPLATES) * 3):
            words = re.findall(r"[a-z]+", shapes.caption(combo, random.Random(seed)))
            assert set(words) <= vocab, set(words) - vocab


def test_held_out_split_is_disjoint_from_training_and_covers_every_word():
    train, held = set(shapes.combos("train")), set(shapes.combos("eval"))
    assert len(train) + len(held) == len(shapes.combos("all")) == 8 * 7 * 4 and not train & held
    captions = shapes.held_out_captions(48)
    assert len(captions) == len(set(captions)) == 48 and captions == shapes.held_out_captions(48)
    assert {shapes.parse_caption(c) for c in captions} <= held
    drawn = {(s.shape, s.color, s.background) for s in _scenes(3000, 1, split="train")}
    assert drawn == {tuple(c) for c in train}  # random_scene("train") reaches all of train and nothing else
    for role in ("shape", "color", "background"):  # every word is trained in every role
        assert {getattr(c, role) for c in train} == set(SHAPES if role == "shape" else COLORS)
    with pytest.raises(ValueError):
        shapes.held_out_captions(57)


def test_classifier_accuracy_on_rendered_scenes():
    scenes = _scenes(300, 123)
    got = [metrics.classify(shapes.render(s)) for s in scenes]
    keys = ("color", "background", "shape")
    acc = {k: np.mean([g[k] == getattr(s, k) for g, s in zip(got, scenes)]) for k in keys}
    assert acc["color"] >= 0.95 and acc["background"] >= 0.95, acc
    assert acc["shape"] >= 0.85, acc
    first = scenes[0]
    text = shapes.caption(first, random.Random(1))
    assert metrics.match(shapes.render(first), text) == dict.fromkeys(keys, True)


def test_classifier_reads_the_object_color_and_shape_of_styled_pictures():
    for stem, img, text in style_art.make_dataset():
        m = metrics.match(img, text)
        assert m["color"] and m["shape"], (stem, text, metrics.classify(img))


def test_style_score_separates_mozart_art_from_plain_scenes():
    styled = [img for _, img, _ in style_art.make_dataset()]
    plain = [shapes.render(s) for s in _scenes(100, 7)]
    assert min(metrics.style_score(i) for i in styled) >= 0.9
    assert max(metrics.style_score(i) for i in plain) <= 0.1
    scenes = _scenes(40, 8, split="eval")
    with_caption = [metrics.style_score(shapes.render(s), shapes.caption(s)) for s in scenes]
    assert max(with_caption) <= 0.1


def test_style_score_with_caption_is_proportional_for_the_weight_slider():
    scores = {w: [] for w in (0.0, 0.5, 1.0)}
    for i, s in enumerate(style_art.dataset_scenes(24, seed=3)):
        plain, styled = shapes.render(s), style_art.render_mozart(s, rng=i)
        for w, values in scores.items():
            values.append(metrics.style_score(Image.blend(plain, styled, w), shapes.caption(s)))
    mean = {w: float(np.mean(values)) for w, values in scores.items()}
    assert mean[0.0] <= 0.05 and mean[1.0] >= 0.9 and 0.3 <= mean[0.5] <= 0.7, mean


def test_mozart_dataset_is_16_training_split_pictures():
    data = style_art.make_dataset()
    assert len(data) == 16
    parsed = [shapes.parse_caption(text) for _, _, text in data]
    assert all(p is not None and not shapes.is_held_out(p.color, p.shape, p.background) for p in parsed)
    assert {p.color for p in parsed} == set(COLORS) and {p.shape for p in parsed} == set(SHAPES)
    assert all(img.size == (64, 64) and img.mode == "RGB" for _, img, _ in data)


def test_committed_mozart_dataset_equals_what_the_script_generates():
    expected = {stem: (img, text) for stem, img, text in style_art.make_dataset()}
    files = sorted(p.name for p in DATASET.iterdir())
    assert files == sorted([f"{s}.png" for s in expected] + [f"{s}.txt" for s in expected])
    for stem, (img, text) in expected.items():
        with Image.open(DATASET / f"{stem}.png") as f:
            assert np.array_equal(np.asarray(f.convert("RGB")), np.asarray(img)), stem
        assert (DATASET / f"{stem}.txt").read_text() == text + "\n"
    assert not list((ROOT / "datasets").rglob("*.py"))  # datasets/ is data only


def test_script_writes_the_dataset(tmp_path):
    argv = sys.argv
    sys.argv = ["make_mozart_art.py", "--out", str(tmp_path), "-n", "4"]
    try:
        runpy.run_path(str(ROOT / "train" / "make_mozart_art.py"), run_name="__main__")
    finally:
        sys.argv = argv
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"mozart_{i:02d}.{ext}" for i in range(4) for ext in ("png", "txt")])


def test_the_vae_s_generic_pictures_are_reproducible_and_go_beyond_the_palette():
    from sd_lora.training.clutter import clutter_images
    from sd_lora.training.shapes import PALETTE

    a, b = clutter_images(12, seed=0), clutter_images(12, seed=0)
    assert a.shape == (12, 64, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, clutter_images(12, seed=1))
    pixels = a.reshape(-1, 3).astype(np.int32)
    palette = np.array(list(PALETTE.values()))
    far = np.abs(pixels[:, None, :] - palette[None]).sum(-1).min(1) > 60  # not near any of the 8 scene colors
    assert far.mean() > 0.5  # cream, gold, pastel... what the scenes never show, so the decoder learns to draw it
