"""sd_lora.training.data: what a user sees when they point the trainer at a folder of images."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from sd_lora.training.buckets import assign_buckets
from sd_lora.training.class_images import generate_class_images, usable_class_images
from sd_lora.training.data import (
    DatasetError,
    ImageRecord,
    load_image,
    read_caption,
    scan_images,
    tag_frequency,
    with_token,
)

PROMPT = "an image in the style of mozart"


def _png16(array: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB)."""
    height, width = array.shape[:2]
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _exif_rotated_jpeg(path):
    """A 40x20 red-left/blue-right JPEG whose EXIF says 'rotate 90° clockwise to view' (orientation 6)."""
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, format="JPEG", exif=exif, quality=95)


@pytest.fixture
def messy(tmp_path):
    """A folder with every kind of image and every kind of bad file; returns (folder, expectations)."""
    root = tmp_path / "mozart_art"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".thumbs").mkdir()
    Image.new("RGB", (100, 60), (200, 10, 10)).save(root / "a.png")
    (root / "a.txt").write_text("a red\nsquare  on a wall\n")
    Image.new("RGB", (64, 64), (10, 200, 10)).save(root / "b.JPG")
    (root / "b.caption").write_text("mozart, a green field")
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 16, 32))
    rgba.save(root / "sub" / "c.PNG")
    Image.new("L", (48, 48), 100).save(root / "sub" / "deeper" / "d.jpeg")
    Image.new("RGB", (30, 30), (10, 20, 200)).convert("P").save(root / "e.bmp")
    Image.new("RGB", (40, 40), (120, 60, 30)).save(root / "f.webp")
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(root / "g.png", transparency=1)
    Image.new("CMYK", (24, 24), (0, 255, 255, 0)).save(root / "h_cmyk.jpg")
    (root / "i_gray16.png").write_bytes(_png16(np.full((8, 8), 40000, np.uint16), 0))
    (root / "j_rgb16.png").write_bytes(_png16(np.full((8, 8, 3), [65535, 0, 32896], np.uint16), 2))
    _exif_rotated_jpeg(root / "k_rotated.jpg")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, format="PNG")
    (root / "corrupt.png").write_bytes(buffer.getvalue()[:60])
    (root / "zero.jpg").write_bytes(b"")
    (root / "fake.png").write_text("this is not a png")
    (root / "notes.txt").write_text("remember to add more images")
    (root / "readme.md").write_text("# my dataset")
    Image.new("RGB", (8, 8)).save(root / ".hidden.png")
    Image.new("RGB", (8, 8)).save(root / ".thumbs" / "t.png")
    return root


def test_scan_finds_images_recursively_in_any_case_with_captions(messy, capsys):
    records = scan_images(messy, caption=PROMPT, token="mozart")
    names = [r.path.relative_to(messy).as_posix() for r in records]
    assert names == ["a.png", "b.JPG", "e.bmp", "f.webp", "g.png", "h_cmyk.jpg", "i_gray16.png", "j_rgb16.png",
                     "k_rotated.jpg", "sub/c.PNG", "sub/deeper/d.jpeg"]
    captions = {r.path.name: r.caption for r in records}
    assert captions["a.png"] == "mozart, a red square on a wall"  # sidecar, whitespace collapsed, token prepended
    assert captions["b.JPG"] == "mozart, a green field"  # .caption sidecar already holds the token
    assert captions["c.PNG"] == PROMPT  # no sidecar: the instance prompt, which holds the token
    sizes = {r.path.name: r.size for r in records}
    assert sizes["a.png"] == (100, 60) and sizes["k_rotated.jpg"] == (20, 40)


def test_an_image_whose_caption_cannot_be_read_is_skipped_with_one_warning(tmp_path):
    """Not trained under the default prompt instead. The unreadable sidecar is a link to /proc/self/mem, whose read()
    fails with EIO even for root (a chmod 000 file would not stop root)."""
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "b.png")
    (tmp_path / "b.txt").symlink_to("/proc/self/mem")
    lines = []
    records = scan_images(tmp_path, caption=PROMPT, token="mozart", warn=lines.append)
    assert [r.path.name for r in records] == ["a.png"]
    assert lines == ["warning: skipped b.png: unreadable caption (b.txt: Input/output error)",
                     "warning: skipped 1 of 2 files (1 unreadable caption); using 1 image"]


def test_bad_files_get_one_warning_line_each_then_a_summary(messy, capsys):
    lines = []
    scan_images(messy, caption=PROMPT, token="mozart", warn=lines.append)
    assert lines[:-1] == [
        "warning: skipped corrupt.png: corrupt image (" + lines[0].split("(", 1)[1],
        "warning: skipped fake.png: not an image (its contents are not a known image format)",
        "warning: skipped notes.txt: not an image (a caption file with no image named notes.*)",
        "warning: skipped readme.md: unsupported file type (use jpg, jpeg, png, webp, bmp)",
        "warning: skipped zero.jpg: empty file (0 bytes)",
    ]
    assert lines[-1] == ("warning: skipped 5 of 16 files (1 corrupt image, 1 empty file, 2 not an image, "
                         "1 unsupported file type); using 11 images")
    assert all("\n" not in line for line in lines)
    scan_images(messy, caption=PROMPT, token="mozart")  # the default warns on stderr
    assert capsys.readouterr().err.count("warning: skipped") == 6


def test_images_are_normalised_to_upright_8bit_rgb(messy):
    loaded = {p.name: load_image(p) for p in messy.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg",
                                                                                       ".bmp", ".webp")
              and p.name not in ("corrupt.png", "fake.png", "zero.jpg")}
    assert all(im.mode == "RGB" for im in loaded.values())
    c = loaded["c.PNG"]
    assert c.getpixel((4, 4)) == (0, 0, 255) and c.getpixel((28, 4)) == (255, 255, 255)  # RGBA on white
    assert loaded["g.png"].getpixel((0, 0)) == (255, 255, 255)  # palette transparency on white
    assert loaded["d.jpeg"].getpixel((5, 5)) == (100, 100, 100)  # grayscale
    assert loaded["i_gray16.png"].getpixel((0, 0)) == (156, 156, 156)  # 16-bit scaled, not clipped to white
    assert loaded["j_rgb16.png"].getpixel((0, 0)) == (255, 0, 128)
    cmyk = loaded["h_cmyk.jpg"].getpixel((5, 5))
    assert cmyk[0] > 200 and cmyk[1] < 50 and cmyk[2] < 50  # CMYK (0, 255, 255, 0) is red
    rotated = loaded["k_rotated.jpg"]  # red was on the left; after a clockwise turn it is on top
    assert rotated.size == (20, 40)
    assert rotated.getpixel((10, 5))[0] > 200 and rotated.getpixel((10, 35))[2] > 200


def test_empty_or_unusable_folders_raise_one_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        scan_images(tmp_path / "missing", caption=PROMPT)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="the folder is empty"):
        scan_images(tmp_path / "empty", caption=PROMPT)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "zero.png").write_bytes(b"")
    (bad / "fake.jpg").write_text("nope")
    lines = []
    with pytest.raises(DatasetError, match="no usable image among 2 files") as caught:
        scan_images(bad, caption=PROMPT, warn=lines.append)
    assert "\n" not in str(caught.value) and len(lines) == 3


def test_captions_and_tokens():
    assert with_token("a cat", "mozart") == "mozart, a cat"
    assert with_token("a cat by Mozart", "mozart") == "a cat by Mozart"
    assert with_token("a cat by mozartian", "mozart") == "mozart, a cat by mozartian"  # whole words only
    assert with_token("", "mozart") == "mozart"
    assert with_token("a cat", None) == "a cat"


def test_empty_sidecar_falls_back_to_the_prompt(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "x.txt").write_text("  \n")
    (tmp_path / "x.caption").write_text("from the caption file")
    assert read_caption(tmp_path / "x.png", PROMPT, "mozart") == "mozart, from the caption file"
    (tmp_path / "x.caption").unlink()
    assert read_caption(tmp_path / "x.png", PROMPT, "mozart") == PROMPT


def test_tag_frequency(messy):
    records = scan_images(messy, caption=PROMPT, token="mozart", warn=None)
    freq = tag_frequency(records, messy)
    assert freq["mozart_art"]["mozart"] == 2 and freq["mozart_art"][PROMPT] == 7
    assert freq["sub"] == {PROMPT: 1} and freq["sub/deeper"] == {PROMPT: 1}


@pytest.fixture(scope="module")
def tiny():
    import sd_lora

    return sd_lora.load_pipeline("tiny")


def test_class_images_are_generated_and_an_interrupted_run_resumes_to_the_same_files(tiny, tmp_path):
    steps = {"num_inference_steps": 2, "resolution": 64, "seed": 5}
    whole = tmp_path / "whole"
    written = generate_class_images(whole, "a painting", 3, tiny, **steps)
    assert [p.name for p in written] == ["class-00000.png", "class-00001.png", "class-00002.png"]

    class Interrupt(Exception):
        pass

    calls = []

    def dies_after_one(*args, **kwargs):
        if calls:
            raise Interrupt
        calls.append(1)
        return tiny(*args, **kwargs)

    part = tmp_path / "part"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(part.mkdir() or part / "mine.jpg")  # a user's own class image
    with pytest.raises(Interrupt):
        generate_class_images(part, "a painting", 4, dies_after_one, **steps)
    assert sorted(p.name for p in part.iterdir()) == ["class-00000.png", "mine.jpg"]  # no half-written file
    resumed = generate_class_images(part, "a painting", 4, tiny, **steps)
    assert [p.name for p in resumed] == ["class-00001.png", "class-00002.png"]
    for name in ("class-00000.png", "class-00001.png", "class-00002.png"):
        assert (part / name).read_bytes() == (whole / name).read_bytes()
    assert generate_class_images(part, "a painting", 4, tiny, **steps) == []  # nothing missing
    records = scan_images(part, caption="a painting", warn=None)
    assert len(records) == 4 and {r.caption for r in records} == {"a painting"}


def test_caption_sidecars_are_read_whatever_the_case_of_their_extension(tmp_path):
    """img0.TXT and img1.Caption caption their images, as a.txt does, instead of being ignored for the prompt."""
    Image.new("RGB", (8, 8)).save(tmp_path / "img0.png")
    (tmp_path / "img0.TXT").write_text("a cat")
    Image.new("RGB", (8, 8)).save(tmp_path / "img1.png")
    (tmp_path / "img1.Caption").write_text("a dog")
    (tmp_path / "notes.TXT").write_text("no image of this name")
    lines = []
    records = scan_images(tmp_path, caption=PROMPT, token="mozart", warn=lines.append)
    assert {r.path.name: r.caption for r in records} == {"img0.png": "mozart, a cat", "img1.png": "mozart, a dog"}
    assert lines == ["warning: skipped notes.TXT: not an image (a caption file with no image named notes.*)",
                     "warning: skipped 1 of 3 files (1 not an image); using 2 images"]


def test_the_caption_sidecar_is_chosen_the_same_way_every_time(tmp_path):
    """.txt before .caption in any case; among case variants of one extension the lower-case one, then by name."""
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    (tmp_path / "x.caption").write_text("from x.caption")
    (tmp_path / "x.Txt").write_text("from x.Txt")
    (tmp_path / "x.TXT").write_text("from x.TXT")
    assert read_caption(image, PROMPT) == "from x.TXT"
    (tmp_path / "x.txt").write_text("from x.txt")
    assert read_caption(image, PROMPT) == "from x.txt"
    assert [r.caption for r in scan_images(tmp_path, caption=PROMPT, warn=None)] == ["from x.txt"]


def test_a_byte_order_mark_is_not_part_of_the_caption(tmp_path):
    """Windows Notepad starts UTF-8 files with a byte-order mark; undecodable bytes still read as U+FFFD."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("\ufeffmozart, a café".encode())
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbfa \xff dog")
    records = scan_images(tmp_path, caption=PROMPT, token="mozart", warn=None)
    assert [r.caption for r in records] == ["mozart, a café", "mozart, a \ufffd dog"]
    assert read_caption(tmp_path / "a.png", PROMPT, "mozart") == "mozart, a café"


def test_excluded_folders_inside_the_images_folder_are_skipped_silently(tmp_path, monkeypatch):
    """`--images nest --output nest/lora`: a second run does not train on the previews, samples and class images
    in nest/lora, nor warn about its checkpoints. Excluding the images folder itself, a parent of it, or a folder
    that does not exist yet excludes nothing."""
    nest = tmp_path / "nest"
    (nest / "lora" / "samples").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(nest / "a.png")
    Image.new("RGB", (8, 8)).save(nest / "b.jpg")
    (nest / "b.txt").write_text("a dog")
    for name in ("preview.png", "loss.png", "samples/step-100.png", "class-00000.png"):
        Image.new("RGB", (8, 8)).save(nest / "lora" / name)
    for name in ("pytorch_lora_weights.safetensors", "config.json", "train.log", "empty.png", "orphan.txt"):
        (nest / "lora" / name).write_bytes(b"" if name == "empty.png" else b"{}")
    assert len(scan_images(nest, caption=PROMPT, warn=None)) == 6  # without exclude, the output is training data

    monkeypatch.chdir(tmp_path)
    lines = []
    records = scan_images("nest", caption=PROMPT, warn=lines.append,
                          exclude=["nest/lora", nest / "cache", nest, tmp_path, tmp_path / "elsewhere"])
    assert [(r.path.name, r.caption) for r in records] == [("a.png", PROMPT), ("b.jpg", "a dog")]
    assert lines == []
    only_samples = scan_images(nest, caption=PROMPT, warn=None, exclude=[nest / "x" / ".." / "lora" / "samples"])
    assert sorted(r.path.name for r in only_samples) == ["a.png", "b.jpg", "class-00000.png", "loss.png",
                                                         "preview.png"]


def test_symlinked_folders_are_followed_and_each_real_folder_is_read_once(tmp_path):
    """`ln -s ~/photos/set1 mozart_art/set1` trains on set1, under the path seen in the images folder. A link to an
    ancestor, a second link to one folder, or a link to an excluded or hidden folder adds nothing; a folder under
    the images folder is read through its own path even when a link to it sorts first. Links to files count, and a
    broken one gets one warning line."""
    photos, root = tmp_path / "photos", tmp_path / "mozart_art"
    (photos / "set1" / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(photos / "set1" / "a.png")
    (photos / "set1" / "a.txt").write_text("from the linked folder")
    Image.new("RGB", (8, 8)).save(photos / "set1" / "sub" / "b.png")
    (photos / "set1" / "sub" / "up").symlink_to(photos / "set1")  # a cycle outside the images folder
    Image.new("RGB", (8, 8)).save(photos / "c.png")
    (root / "real" / "loop").mkdir(parents=True)
    (root / "lora").mkdir()
    Image.new("RGB", (8, 8)).save(root / "own.png")
    Image.new("RGB", (8, 8)).save(root / "real" / "r.png")
    Image.new("RGB", (8, 8)).save(root / "lora" / "preview.png")
    (root / "set1").symlink_to(photos / "set1")
    (root / "z_set1_again").symlink_to(photos / "set1")
    (root / ".hidden_set1").symlink_to(photos / "set1")
    (root / "a_real_alias").symlink_to(root / "real")
    (root / "real" / "loop" / "top").symlink_to(root)
    (root / "lora_link").symlink_to(root / "lora")
    (root / "linked.png").symlink_to(photos / "c.png")
    (root / "gone.png").symlink_to(photos / "missing.png")
    lines = []
    records = scan_images(root, caption=PROMPT, warn=lines.append, exclude=[root / "lora"])
    assert [r.path.relative_to(root).as_posix() for r in records] == [
        "linked.png", "own.png", "real/r.png", "set1/a.png", "set1/sub/b.png"]
    assert records[3].path == root / "set1" / "a.png" and records[3].caption == "from the linked folder"
    assert lines == ["warning: skipped gone.png: unreadable (a broken symlink)",
                     "warning: skipped 1 of 6 files (1 unreadable); using 5 images"]
    assert len(usable_class_images(root)) == 6  # a class folder, no exclude: lora/preview.png counts, once


def test_excluded_folders_reached_through_a_link_are_skipped(tmp_path):
    """`--output runs/out` with a link `mozart_art/outs -> runs/out`: the run does not train on its own previews and
    samples, through that link, one to a folder under it, or one to a folder holding it. A link to a folder that
    does not exist yet is a broken symlink, like a broken link to a file."""
    root, runs = tmp_path / "mozart_art", tmp_path / "runs"
    (runs / "out" / "samples").mkdir(parents=True)
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "own.png")
    Image.new("RGB", (8, 8)).save(runs / "kept.png")
    for name in ("preview.png", "samples/step-100.png"):
        Image.new("RGB", (8, 8)).save(runs / "out" / name)
    (root / "outs").symlink_to(runs / "out")
    (root / "samples").symlink_to(runs / "out" / "samples")
    (root / "runs").symlink_to(runs)
    (root / "later").symlink_to(runs / "not_yet")
    lines = []
    records = scan_images(root, caption=PROMPT, warn=lines.append, exclude=[runs / "out", root, tmp_path])
    assert [r.path.relative_to(root).as_posix() for r in records] == ["own.png", "runs/kept.png"]
    assert lines == ["warning: skipped later: unreadable (a broken symlink)",
                     "warning: skipped 1 of 3 files (1 unreadable); using 2 images"]
    assert len(scan_images(root, caption=PROMPT, warn=None)) == 4  # without exclude, the output is read, once


def test_a_link_to_an_ancestor_adds_nothing(tmp_path):
    """`ln -s .. mozart_art/up` or `ln -s ~ mozart_art/home` would pull in every sibling folder of the images folder
    (all of $HOME); such links, and one to the images folder itself, are not followed."""
    root = tmp_path / "home" / "me" / "mozart_art"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "home" / "me" / "documents").mkdir()
    Image.new("RGB", (8, 8)).save(root / "sub" / "own.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "home" / "me" / "documents" / "scan.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "home" / "me" / "photo.png")
    (root / "up").symlink_to("..")
    (root / "sub" / "home").symlink_to(tmp_path / "home")
    (root / "sub" / "again").symlink_to(root)
    lines = []
    records = scan_images(root, caption=PROMPT, warn=lines.append)
    assert [r.path.relative_to(root).as_posix() for r in records] == ["sub/own.png"] and lines == []
    assert len(usable_class_images(root)) == 1


def test_full_image_name_sidecars_caption_their_image(tmp_path):
    """Some captioning tools write x.png.txt; it captions x.png (name.txt still wins) instead of being reported as
    a caption file with no image."""
    for name in ("x.png", "y.png", "z.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "x.png.txt").write_text("a cat")
    (tmp_path / "y.png.txt").write_text("the long name")
    (tmp_path / "y.txt").write_text("the short name")
    (tmp_path / "z.jpg.CAPTION").write_text("a dog")
    (tmp_path / "w.png.txt").write_text("no image of this name")
    lines = []
    records = scan_images(tmp_path, caption=PROMPT, warn=lines.append)
    assert {r.path.name: r.caption for r in records} == {"x.png": "a cat", "y.png": "the short name",
                                                         "z.jpg": "a dog"}
    assert lines == ["warning: skipped w.png.txt: not an image (a caption file with no image named w.png.*)",
                     "warning: skipped 1 of 4 files (1 not an image); using 3 images"]
    assert read_caption(tmp_path / "x.png", PROMPT) == "a cat"
    assert read_caption(tmp_path / "y.png", PROMPT) == "the short name"
    (tmp_path / "y.txt").write_text(" \n")  # an empty name.txt falls through to the long name
    assert read_caption(tmp_path / "y.png", PROMPT) == "the long name"


def test_a_caption_that_is_not_utf8_is_used_with_one_warning(tmp_path):
    """A Latin-1 café: trained on as caf\ufffd rather than skipped, but the user hears of it once."""
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "a.png")
    (tmp_path / "sub" / "a.txt").write_bytes("a café".encode("latin-1"))
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    (tmp_path / "b.png.txt").write_bytes(b"\xef\xbb\xbfa \xff\xfe dog")
    lines = []
    records = scan_images(tmp_path, caption=PROMPT, token="mozart", warn=lines.append)
    assert [r.caption for r in records] == ["mozart, a \ufffd\ufffd dog", "mozart, a caf\ufffd"]
    assert lines == ["warning: b.png.txt: not UTF-8; 2 bytes replaced with U+FFFD (save it as UTF-8)",
                     "warning: sub/a.txt: not UTF-8; 1 byte replaced with U+FFFD (save it as UTF-8)"]
    lines.clear()
    assert read_caption(tmp_path / "sub" / "a.png", PROMPT) == "a caf\ufffd"  # silent by default
    assert read_caption(tmp_path / "sub" / "a.png", PROMPT, warn=lines.append) == "a caf\ufffd"
    sidecar = tmp_path / "sub" / "a.txt"  # read_caption names it in full
    assert lines == [f"warning: {sidecar}: not UTF-8; 1 byte replaced with U+FFFD (save it as UTF-8)"]


def test_records_remember_the_caption_file_they_used(messy, tmp_path):
    records = assign_buckets(scan_images(messy, caption=PROMPT, token="mozart", warn=None), 64)
    sidecars = {r.path.name: r.sidecar for r in records}
    assert sidecars["a.png"] == messy / "a.txt" and sidecars["b.JPG"] == messy / "b.caption"
    assert sidecars["c.PNG"] is None and sum(s is not None for s in sidecars.values()) == 2
    other = tmp_path / "other"
    other.mkdir()
    Image.new("RGB", (8, 8)).save(other / "x.png")
    (other / "x.txt").write_text("  \n")  # empty: not the one used
    (other / "x.caption").write_text("from the caption file")
    Image.new("RGB", (8, 8)).save(other / "y.png")
    (other / "y.txt").write_text("")
    assert [r.sidecar for r in scan_images(other, caption=PROMPT, warn=None)] == [other / "x.caption", None]
    assert ImageRecord(messy / "a.png", "a", (8, 8), (8, 8)).sidecar is None  # positional fields as before
