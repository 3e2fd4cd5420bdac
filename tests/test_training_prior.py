"""Prior preservation (--class-prompt, --class-images, --num-class-images, --prior-weight) as a user of
train/style.py meets it: class images generated once and resumed after a kill, bad files skipped and not counted,
read-only folders, folders that hold what the run reads or writes, and the prior loss itself.

Everything runs the tiny model on the CPU with one thread (see tests/test_training_loop.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import STYLE, env, style_args, style_folder, style_main
from helpers import train_config as config
from PIL import Image

import sd_lora
from sd_lora.training import loop
from sd_lora.training.class_images import generate_class_images

FLAGS = ("--steps", "1", "--sample-every", "0", "--save-every", "0", "--class-prompt", "a painting")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(loop, "SAMPLE_STEPS", 2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def images(tmp_path):
    return style_folder(tmp_path)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@contextmanager
def read_only(folder: Path):
    """`folder` cannot be written in, even by root (chattr +i), or skip."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = ["chmod", "755", str(folder)]
    else:
        try:
            subprocess.run(["chattr", "+i", str(folder)], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError):
            pytest.skip("root cannot make a folder read-only here (chattr +i failed)")
        undo = ["chattr", "-i", str(folder)]
    try:
        yield folder
    finally:
        subprocess.run(undo, check=True)


def stop_once(command: list[str], made: Path, how: signal.Signals) -> tuple[int, str]:
    """Start `command` and send it `how` as soon as `made` exists: its exit code and stderr."""
    run = subprocess.Popen(command, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not made.exists() and run.poll() is None:
        assert time.time() < deadline
        time.sleep(0.01)
    run.send_signal(how)
    err = run.communicate(timeout=120)[1]
    return run.returncode, err


def test_a_stopped_or_killed_generation_resumes_to_the_same_class_images_and_leaves_no_temp_file(images, tmp_path):
    """SIGTERM once one class image exists, SIGKILL once two do; the last run makes only the missing ones, and the
    folder is what an uninterrupted generation makes, bit for bit. SIGTERM's one line starts a line of its own (not
    glued to the progress bar), and the temp file a kill mid-write leaves is removed, not left for ever."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    generate_class_images(whole, "a painting", 4, sd_lora.load_pipeline("tiny"), 64)  # the run's defaults, in one go
    command = [sys.executable, str(STYLE), *style_args(images, killed, *FLAGS, "--num-class-images", "4")]
    classes = killed / "class_images"

    code, err = stop_once(command, classes / "class-00000.png", signal.SIGTERM)
    said = [line.split("\r")[-1] for line in err.split("\n") if "interrupted" in line]
    assert code == 143 and said == ["style.py: interrupted before the first checkpoint; nothing to resume"], err
    assert "class-00003.png" not in names(classes) and not list(classes.glob(".*"))  # SIGTERM removes its temp file

    stop_once(command, classes / "class-00001.png", signal.SIGKILL)
    assert "class-00003.png" not in names(classes)
    stale = classes / ".class-00003.png.0123456789ab.tmp"  # a kill during a write leaves one
    stale.write_bytes((whole / "class-00003.png").read_bytes()[:100])

    subprocess.run(command, check=True, capture_output=True, env=env(), timeout=300)
    assert names(classes) == [f"class-0000{i}.png" for i in range(4)]  # no temp file left
    for name in names(whole):
        assert (classes / name).read_bytes() == (whole / name).read_bytes()
        with Image.open(classes / name) as image:
            assert (image.format, image.size) == ("PNG", (64, 64))


def test_bad_files_in_the_class_folder_are_skipped_and_do_not_count(images, tmp_path, capsys):
    """Corrupt, zero-byte and non-image files get one warning line each (naming the class images) and a summary;
    they do not count toward --num-class-images. Hidden files are ignored, subfolders searched, RGBA and 16-bit
    images and other aspect ratios used. A class-NNNNN.png that is no usable image is generated again, not kept for
    ever."""
    classes = tmp_path / "classes"
    (classes / "sub").mkdir(parents=True)
    Image.new("RGBA", (64, 64), (200, 0, 0, 128)).save(classes / "rgba.png")
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(classes / "gray16.png")
    Image.new("RGB", (96, 64), (0, 200, 0)).save(classes / "sub" / "wide.jpg")
    (classes / "class-00000.png").write_bytes(b"")  # e.g. a copy that ran out of disk space
    (classes / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (classes / "notes.txt").write_text("not a caption")
    (classes / ".DS_Store").write_bytes(b"clutter")

    loop.train(config(images, tmp_path / "out", steps=1, class_prompt="a painting", class_images=str(classes),
                      num_class_images=4))
    assert names(classes) == [".DS_Store", "class-00000.png", "gray16.png", "notes.txt", "rgba.png", "sub", "x.png"]
    with Image.open(classes / "class-00000.png") as image:
        assert (image.format, image.size) == ("PNG", (64, 64))
    captured = capsys.readouterr()
    assert "4 class images of 'a painting'" in captured.out
    warned = [line for line in captured.err.splitlines() if line.startswith("warning: class images: ")]
    assert warned == [
        "warning: class images: skipped notes.txt: not an image (a caption file with no image named notes.*)",
        "warning: class images: skipped x.png: not an image (its contents are not a known image format)",
        "warning: class images: skipped 2 of 6 files (2 not an image); using 4 images",
    ]


def test_the_class_folder_leaves_out_the_training_images_and_the_runs_output(images, tmp_path, capsys):
    """A class folder that holds the images folder, or the output folder, counts neither the training images nor the
    run's previews, samples and loss plot as class images: the missing ones are generated."""
    data = images.parent  # holds the images folder
    loop.train(config(images, tmp_path / "out1", steps=1, class_prompt="a painting", class_images=str(data),
                      num_class_images=2))
    assert {"class-00000.png", "class-00001.png"} <= set(names(data))
    assert "2 class images of 'a painting'" in capsys.readouterr().out

    shared = tmp_path / "shared"  # holds the output folder
    for count in (2, 3):  # the second run would count the first one's preview, loss plot and sample
        loop.train(config(images, shared / "out", steps=1, class_prompt="a painting", class_images=str(shared),
                          num_class_images=count, overwrite=True))
    assert names(shared) == ["class-00000.png", "class-00001.png", "class-00002.png", "out"]


def test_class_images_in_the_output_folder_itself_are_refused(images, tmp_path, capsys):
    out = tmp_path / "out"
    code, line = style_main(style_args(images, out, *FLAGS, "--class-images", str(out), "--num-class-images", "2"),
                            capsys, model_loads=True)
    assert code == 2 and "--class-images" in line and "is the --output folder" in line
    assert not list(out.glob("*.png"))


def test_a_read_only_class_folder_is_read_when_full_and_refused_when_not(images, tmp_path, capsys):
    classes = tmp_path / "classes"
    classes.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (30 * i, 90, 200)).save(classes / f"mine-{i}.png")
    with read_only(classes):
        result = loop.train(config(images, tmp_path / "full", steps=1, class_prompt="a painting",
                                   class_images=str(classes), num_class_images=2))
        assert result["steps"] == 1
        capsys.readouterr()
        code, line = style_main(style_args(images, tmp_path / "short", *FLAGS, "--class-images", str(classes),
                                           "--num-class-images", "3"), capsys, model_loads=True)
    assert code == 2
    assert line.startswith(f"style.py: error: --class-images {classes}: holds 2 of the 3 class images wanted")
    assert "--num-class-images 2" in line
    assert names(classes) == ["mine-0.png", "mine-1.png"]


def test_the_prior_loss_is_added_with_its_weight(images, tmp_path):
    """--prior-weight 0 trains exactly as without prior preservation; the first step's loss grows linearly with the
    weight, by the class batch's loss (> 0)."""
    prior = {"class_prompt": "a painting", "class_images": str(tmp_path / "classes"), "num_class_images": 2}
    first = {w: loop.train(config(images, tmp_path / f"w{w}", steps=1, prior_weight=w, text_encoder=False,
                                  **prior))["losses"][0] for w in (1.0, 0.0, 2.0)}
    without = loop.train(config(images, tmp_path / "none", steps=1, text_encoder=False))["losses"][0]
    assert first[0.0] == without
    prior_loss = first[1.0] - first[0.0]
    assert prior_loss > 0 and first[2.0] - first[0.0] == pytest.approx(2 * prior_loss, rel=1e-5)


def test_two_runs_sharing_a_class_folder_take_turns(tmp_path, capsys):
    """While one run generates into a class folder, another waits for it (a note says so), then counts again and
    generates only what is still missing: nothing here."""
    fcntl = pytest.importorskip("fcntl")
    folder = tmp_path / "classes"
    folder.mkdir()
    other = os.open(folder, os.O_RDONLY)  # the other run's lock
    fcntl.flock(other, fcntl.LOCK_EX)
    written = []
    waiting = threading.Thread(target=lambda: written.append(
        generate_class_images(folder, "a painting", 2, sd_lora.load_pipeline("tiny"), 64, num_inference_steps=2)),
        daemon=True)
    try:
        waiting.start()
        err, deadline = "", time.time() + 60
        while "another run is generating class images" not in err:
            assert time.time() < deadline and waiting.is_alive(), err
            time.sleep(0.05)
            err += capsys.readouterr().err
        for i in range(2):  # what the other run made meanwhile
            Image.new("RGB", (64, 64), (i, 0, 0)).save(folder / f"class-0000{i}.png")
    finally:
        os.close(other)
    waiting.join(60)
    assert written == [[]]
