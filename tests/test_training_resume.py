"""--resume and the output folder's owner, as a user meets them: a checkpoint from elsewhere is read without
unpickling anything, a broken one gets one line before the model loads, a second run cannot train into a folder a
run is training in, a resume with another number of processes goes on with the next batch, a moved images folder
resumes and a changed one resumes with a warning. Kill -9 and exact resume: tests/test_training_loop.py. Tiny model,
CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import STYLE, env, multi_gpu, style_args, style_folder, style_main
from helpers import train_config as config
from PIL import Image
from safetensors.torch import load_file, save_file

from sd_lora.training import checkpoint, loop, run_folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(images, output) of a finished 4-step run with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("trained")
    images = style_folder(root)
    loop.train(config(images, root / "out", steps=4, save_every=2))
    return images, root / "out"


def a_copy(trained, tmp_path: Path) -> tuple[Path, Path]:
    """The trained run's output folder copied, so a test may break it; its step-2 checkpoint."""
    out = tmp_path / "out"
    shutil.copytree(trained[1], out)
    return out, out / "checkpoints" / "step-2"


def edit_state(folder: Path, **changes) -> None:
    path = folder / checkpoint.STATE_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


class Planted:
    """Unpickling this touches a file: what a malicious checkpoint would do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"])
def test_resume_never_unpickles_code_in_a_checkpoint(trained, tmp_path, capsys, no_model, name):
    """Before, the trainer's state went through accelerate's custom-state pickle (loaded with weights_only=False),
    so a shared checkpoint could run code on --resume."""
    out, step = a_copy(trained, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"state": Planted(marker)}, step / name)
    code, err = style_main(style_args(trained[0], out, "--resume", str(step), "--steps", "6"), capsys)
    assert code == 2 and not marker.exists()
    assert f"--resume: {step / name}: cannot be read as weights-only tensors" in err and "could run code" in err


@pytest.mark.parametrize("damage,message", [
    (lambda step: (step / checkpoint.LORA_FILE).write_bytes((step / checkpoint.LORA_FILE).read_bytes()[:100]),
     f"{checkpoint.LORA_FILE}: cannot be read"),
    (lambda step: (step / checkpoint.LORA_FILE).unlink(), f"{checkpoint.LORA_FILE}: cannot be read"),
    (lambda step: (step / checkpoint.STATE_FILE).write_text(json.dumps({"step": 2, "loss": 0.5})),  # an old layout
     f"{checkpoint.STATE_FILE}: not a readable sd-lora trainer state (no valid batches, processes"),
    (lambda step: edit_state(step, step=-1), "not a readable sd-lora trainer state (no valid step, "),
    (lambda step: edit_state(step, losses=["a"] * 4), "not a readable sd-lora trainer state (no valid losses)"),
    (lambda step: (step / checkpoint.STATE_FILE).write_text("[1]"), "not a readable sd-lora trainer state"),
    (lambda step: (step / checkpoint.OPTIMIZER_FILE).unlink(), f"{checkpoint.OPTIMIZER_FILE}: missing"),
])
def test_a_broken_checkpoint_is_one_line_before_the_model_loads(trained, tmp_path, capsys, no_model, damage,
                                                                  message):
    out, _ = a_copy(trained, tmp_path)
    damage(out / "checkpoints" / "step-4")  # the latest
    code, err = style_main(style_args(trained[0], out, "--resume", "latest", "--steps", "6"), capsys)
    assert code == 2 and message in err and "step-4" in err, err


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_a_checkpoint_of_another_network_is_refused_and_nothing_is_written(trained, tmp_path, capsys):
    """The shapes match run.json's claims only if nobody edited it: a step-2 LoRA file of rank 8 gets one line,
    found once the model has loaded; neither the run's folder nor a new --output is touched."""
    out, step = a_copy(trained, tmp_path)
    lora = load_file(str(step / checkpoint.LORA_FILE))
    save_file({k: torch.zeros(8, v.shape[1]) if v.shape[0] == 4 else v for k, v in lora.items()},
              str(step / checkpoint.LORA_FILE))
    before = listing(out)
    for target in (out, tmp_path / "elsewhere"):
        code, err = style_main(style_args(trained[0], target, "--resume", str(step), "--steps", "6",
                                          "--sample-every", "0", "--save-every", "0"), capsys, model_loads=True)
        assert code == 2 and "the checkpoint holds another network" in err
    assert listing(out) == before and not (tmp_path / "elsewhere").exists()


def test_resuming_an_earlier_checkpoint_drops_the_later_ones(trained, tmp_path, capsys):
    """Going back to step 2 of a run that reached step 4 starts a new history: step-4 of the old one would be taken
    for this run's by --resume latest (and --keep-checkpoints deleted the checkpoint it resumed from instead)."""
    out, step = a_copy(trained, tmp_path)
    loop.train(config(trained[0], out, steps=3, save_every=2, resume=str(step)))
    assert "note: --resume from step 2: removed the later checkpoints of the run it goes back on (step-4)" in \
        capsys.readouterr().err
    assert [s for s, _ in checkpoint.checkpoints(out)] == [2, 3]
    assert checkpoint.find_checkpoint("latest", out).name == "step-3"


def test_a_resume_with_epochs_already_trained_is_refused(trained, tmp_path, capsys):
    """4 steps of one image each over 4 images is one epoch: --epochs 1 leaves nothing, as --steps 4 does."""
    out, _ = a_copy(trained, tmp_path)
    before = listing(out)
    code, err = style_main(style_args(trained[0], out, "--resume", "latest", "--epochs", "1"), capsys,
                           model_loads=True)
    assert code == 2 and err.endswith("has trained 1 epochs (step 4), and --epochs 1 leaves nothing to train; pass "
                                      "more --epochs to train on")
    assert listing(out) == before


@pytest.mark.parametrize("damage", ["missing", "garbage", "a list"])
def test_a_folder_whose_run_json_is_lost_is_not_taken_over(trained, tmp_path, capsys, no_model, damage):
    """With run.json gone, another run took the folder over without --overwrite, mixing its checkpoints with the
    old run's. The checkpoints' own copies still say whose they are; an adapter alone is not replaced either."""
    out, _ = a_copy(trained, tmp_path)
    run = out / run_folder.RUN_FILE
    if damage == "missing":
        run.unlink()
    else:
        run.write_text("garbage{" if damage == "garbage" else "[]")
    code, err = style_main(style_args(trained[0], out, "--rank", "8", "--steps", "2"), capsys)
    assert code == 2 and err.endswith(f"{out} holds a different run (--rank 4 there, 8 here); pass --overwrite to "
                                      "replace it, or choose another --output")  # a resume would be refused
    code, err = style_main(style_args(trained[0], out, "--steps", "9"), capsys)
    assert code == 2 and err.endswith(f"{out} holds a different run (--steps 4 there, 9 here); pass --resume latest "
                                      "to continue that run, --overwrite to replace it, or choose another --output")
    shutil.rmtree(out / "checkpoints")
    code, err = style_main(style_args(trained[0], out, "--rank", "8", "--steps", "2"), capsys)
    assert code == 2 and err.endswith(f"{out} holds an adapter inkwash.safetensors but no readable run.json that "
                                      "says which run wrote it; pass --overwrite to replace it, or choose another "
                                      "--output")


def test_the_output_cannot_be_the_images_folder(trained, tmp_path, capsys, no_model):
    """Its previews, samples and checkpoints would be trained on when the run is resumed."""
    code, err = style_main(style_args(trained[0], trained[0], "--steps", "2"), capsys)
    assert code == 2 and err.endswith(f"--output {trained[0]} is the --images folder: what the run writes there "
                                      "would become training data; choose another folder")


@pytest.mark.parametrize("planted", ["a link to a file", "a folder"])
def test_a_lock_file_that_is_not_a_plain_file_is_refused_untouched(trained, tmp_path, capsys, no_model, planted):
    """The lock used to be opened through a symlink and truncated: a planted link emptied its target."""
    out, precious = tmp_path / "out", tmp_path / "precious.txt"
    out.mkdir()
    precious.write_text("keep me")
    if planted == "a folder":
        (out / run_folder.LOCK_FILE).mkdir()
    else:
        (out / run_folder.LOCK_FILE).symlink_to(precious)
    code, err = style_main(style_args(trained[0], out, "--steps", "2"), capsys)
    assert code == 2 and f"{out / run_folder.LOCK_FILE}: cannot be used as the run's lock file" in err
    assert precious.read_text() == "keep me"


@pytest.mark.parametrize("steps", ["4", "3"])
def test_resume_with_nothing_left_to_train_is_refused(trained, tmp_path, capsys, no_model, steps):
    """It used to "finish" at once, re-save the step-4 adapter as the result and record --steps 3 as the run's."""
    out, _ = a_copy(trained, tmp_path)
    code, err = style_main(style_args(trained[0], out, "--resume", "latest", "--steps", steps), capsys)
    assert code == 2 and err.endswith(f"is at step 4, and --steps {steps} leaves nothing to train; pass --steps "
                                      "above 4 to train on")


def test_a_second_run_cannot_train_in_a_folder_a_run_is_training_in(tmp_path, capsys):
    """Before its first checkpoint, a running run's folder looked abandoned, and a second run took it over and
    cleared it under the first one's feet. Once the first is gone (killed), its folder is free again."""
    images, out = style_folder(tmp_path), tmp_path / "out"
    first = subprocess.Popen([sys.executable, str(STYLE), *style_args(images, out, "--steps", "100000",
                                                                      "--sample-every", "0", "--save-every", "0")],
                             env=env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (out / run_folder.RUN_FILE).is_file() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None and (out / run_folder.RUN_FILE).is_file()
        code, err = style_main(style_args(images, out, "--steps", "2"), capsys)
        assert code == 2 and err.endswith(f"{out}: another sd-lora run (process {first.pid}) is training in this "
                                          "folder; wait for it to finish, stop it, or choose another --output")
        code, err = style_main(style_args(images, out, "--steps", "2", "--overwrite"), capsys)
        assert code == 2 and "another sd-lora run" in err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    result = loop.train(config(images, out, steps=2))
    assert result["steps"] == 2 and (out / "inkwash.safetensors").is_file()


def test_a_resume_with_another_number_of_processes_goes_on_with_the_next_batch(tmp_path, capsys):
    """--epochs 2 over 4 images (one per batch) is 8 batches: 4 steps with two processes. Resumed at step 2 (4
    batches done) with one process, 4 batches are left: 4 more steps, not the 8 - 2 a per-process count gave (which
    also trained the batches at positions 2 and 3 again)."""
    images, out = style_folder(tmp_path), tmp_path / "out"
    multi_gpu(images, out, tmp_path, "--epochs", "2", "--save-every", "2")
    step = out / "checkpoints" / "step-2"
    assert json.loads((step / checkpoint.STATE_FILE).read_text())["batches"] == 4
    result = loop.train(config(images, tmp_path / "resumed", epochs=2, save_every=0, lr=1e-3, resume=str(step)))
    assert result["steps"] == 6
    assert f"warning: --resume: {step} was trained with 2 processes, this run has 1" in capsys.readouterr().err
    saved = json.loads((tmp_path / "resumed" / "checkpoints" / "step-6" / checkpoint.STATE_FILE).read_text())
    assert saved["batches"] == 8 and saved["processes"] == 1


# ---------------------------------------------------------------------------------------------------------------
# The images folder: moved, renamed, or changed in place


def same_tensors(a: Path, b: Path) -> bool:
    a, b = load_file(str(a)), load_file(str(b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def moved_images(trained, tmp_path: Path, name: str = "inkwash") -> Path:
    """The trained run's images in another folder, as `mv` (or moving the whole project) leaves them. A folder of
    another name gives another default token."""
    moved = tmp_path / "elsewhere" / name
    shutil.copytree(trained[0], moved)
    return moved


def resume_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(("note: ", "warning: --resume"))]


def test_run_json_records_the_images_as_scanned_not_as_edited_while_the_model_loads(tmp_path, monkeypatch):
    """An image added after the scan is not trained on, so run.json must not say it was: a resume would then take
    the changed folder for the one the run trained on."""
    import sd_lora

    images, pipe = style_folder(tmp_path), sd_lora.load_pipeline("tiny")
    as_scanned = run_folder.fingerprint(config(images, tmp_path / "out").resolved())
    moved_to = pipe.to

    def to(*args, **kwargs):  # the trainer moves the model to its device after the scan: a user adds an image
        if not (images / "late.png").exists():
            shutil.copy(images / "art_1.png", images / "late.png")
        return moved_to(*args, **kwargs)

    monkeypatch.setattr(pipe, "to", to)
    loop.train(config(images, tmp_path / "out", steps=1), pipe=pipe)
    assert (images / "late.png").exists() and "late.png" not in as_scanned
    assert json.loads((tmp_path / "out" / run_folder.RUN_FILE).read_text())["dataset"] == as_scanned


def test_a_moved_images_folder_resumes_and_ends_where_an_uninterrupted_run_does(trained, tmp_path, capsys):
    """run.json recorded the images folder's path only, so after `mv` the run's checkpoints were "a different run":
    progress lost, or --overwrite. The same files elsewhere are the same run: one note, and the adapter of the run
    that was never interrupted, bit for bit."""
    out, _ = a_copy(trained, tmp_path)
    shutil.rmtree(out / "checkpoints" / "step-4")  # stopped after step 2
    (out / "inkwash.safetensors").unlink()
    moved = moved_images(trained, tmp_path)
    result = loop.train(config(moved, out, steps=4, save_every=2, resume="latest"))
    assert result["steps"] == 4
    assert resume_lines(capsys.readouterr().err) == [
        f"note: --resume: the images folder moved: {trained[0].resolve()} -> {moved.resolve()}"]
    assert same_tensors(out / "inkwash.safetensors", trained[1] / "inkwash.safetensors")
    assert json.loads((out / run_folder.RUN_FILE).read_text())["identity"]["images"] == str(moved.resolve())


def test_a_renamed_images_folder_resumes_with_the_runs_token(trained, tmp_path, capsys, no_model):
    """The token defaults to the folder's name, and the captions hold it: renamed, the folder trains another token,
    so the resume is refused, but the line says how to keep the run's."""
    out, _ = a_copy(trained, tmp_path)
    renamed = moved_images(trained, tmp_path, name="art2")
    code, err = style_main(style_args(renamed, out, "--resume", "latest", "--steps", "6"), capsys)
    assert code == 2 and err.endswith("comes from a different run (--token 'inkwash' there, 'art2' here); only "
                                      "--steps and --epochs may change when resuming; the token defaults to the "
                                      "images folder's name: pass --token inkwash to continue the run")
    found = run_folder.check_output(config(renamed, out, steps=6, token="inkwash", resume="latest").resolved())
    assert found == out / "checkpoints" / "step-4"
    assert capsys.readouterr().err == f"note: --resume: the images folder moved: {trained[0].resolve()} -> " \
                                      f"{renamed.resolve()}\n"


def test_a_renamed_folder_without_output_is_pointed_at_its_runs_folder(trained, tmp_path, capsys, no_model,
                                                                        monkeypatch):
    """Renamed, the folder also gives another default --output (output/<token>), which holds nothing: the line
    names the folder beside it whose checkpoints trained on the same images, and the flag that continues them."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained[1], tmp_path / "output" / "inkwash")
    renamed = moved_images(trained, tmp_path, name="art2")
    argv = ["--images", str(renamed), "--model", "tiny", "--log-with", "none", "--resume", "latest", "--steps", "6"]
    code, err = style_main(argv, capsys)
    assert code == 2 and err.endswith(f"{Path('output') / 'art2'} holds no checkpoint to resume (they are saved "
                                      "every --save-every steps under <output>/checkpoints); start without --resume. "
                                      f"{Path('output') / 'inkwash'} holds checkpoints of a run on these same images: "
                                      "pass --token inkwash to continue it")
    (tmp_path / "output" / "inkwash").rename(tmp_path / "output" / "kept")  # not where --token alone leads
    code, err = style_main(argv, capsys)
    assert code == 2 and err.endswith("pass --token inkwash --output output/kept to continue it")
    shutil.copy(renamed / "art_1.png", renamed / "art_9.png")
    code, err = style_main(argv, capsys)
    assert code == 2 and err.endswith("start without --resume")  # other images: not that run's
    assert sorted(p.name for p in (tmp_path / "output").iterdir()) == ["kept"]


def test_what_training_does_not_see_is_no_change(trained, tmp_path, capsys, no_model):
    """A copy has new modification times; a caption re-saved by Notepad (byte-order mark, CRLF) reads the same; a
    stray note, an unused .caption beside the .txt and hidden files are not trained on: the folder only moved."""
    out, _ = a_copy(trained, tmp_path)
    moved = moved_images(trained, tmp_path)
    (moved / "art_0.txt").write_bytes("\ufeffa blue circle,\r\n ink outline\r\n".encode())
    (moved / "art_0.caption").write_text("never read: art_0.txt comes first")
    (moved / "todo.md").write_text("more images")
    (moved / ".DS_Store").write_bytes(b"\0\0")
    assert run_folder.check_output(config(moved, out, steps=6, resume="latest").resolved()) is not None
    assert resume_lines(capsys.readouterr().err) == [
        f"note: --resume: the images folder moved: {trained[0].resolve()} -> {moved.resolve()}"]


def _add(images: Path) -> None:
    shutil.copyfile(images / "art_1.png", images / "art_4.png")


def _replace(images: Path) -> None:
    Image.new("RGB", (64, 64), (200, 30, 30)).save(images / "art_2.png")


@pytest.mark.parametrize("change,what", [
    (_add, "1 image added"),
    (lambda images: (images / "art_3.png").unlink(), "1 image removed"),
    (lambda images: (images / "art_0.txt").write_text("a blue disc, ink outline"), "1 image recaptioned"),
    (lambda images: ((images / "art_3.png").unlink(), (images / "art_1.txt").write_text("a frame"), _add(images),
                     _replace(images)), "1 image added, 1 removed, 1 changed, 1 recaptioned"),
])
def test_images_changed_in_place_resume_with_a_warning(tmp_path, capsys, change, what):
    """Changed images used to resume silently, although neither the data order nor the training were the run's any
    more. Who removed a bad image or fixed a caption wants to go on, not to lose the run: --resume goes on, with one
    warning line that says what changed. A new run without --resume is not told "--resume latest" as if nothing
    had changed."""
    images, out = style_folder(tmp_path), tmp_path / "out"
    loop.train(config(images, out, steps=2, save_every=2))
    change(images)
    capsys.readouterr()
    code, err = style_main(style_args(images, out, "--steps", "2", "--save-every", "2"), capsys)
    assert code == 2 and err.endswith(
        f"{out} holds this run's checkpoints up to step 2, trained on other images than {images} holds now ({what}); "
        "pass --overwrite to start over on them, --resume latest to go on from there with them (not as the run "
        "would have gone), or choose another --output")
    assert loop.train(config(images, out, steps=3, save_every=2, resume="latest"))["steps"] == 3
    warning = (f"warning: --resume: the images in {images} changed since {out / 'checkpoints' / 'step-2'} was saved "
               f"({what}): training goes on with them, but not as the original run would have")
    assert resume_lines(capsys.readouterr().err) == [warning]
    assert run_folder.check_output(config(images, out, steps=4, save_every=2, resume="latest").resolved())
    assert resume_lines(capsys.readouterr().err) == []  # its checkpoints now hold the images it trained on


def test_a_run_json_without_a_fingerprint_resumes_by_path(trained, tmp_path, capsys):
    """run.json files written before the fingerprint: the images folder's path decides, as it did."""
    out, _ = a_copy(trained, tmp_path)
    for run in (out / run_folder.RUN_FILE, *(out / "checkpoints").glob(f"*/{run_folder.RUN_FILE}")):
        run.write_text(json.dumps({k: v for k, v in json.loads(run.read_text()).items() if k != "dataset"}))
    moved = moved_images(trained, tmp_path)
    code, err = style_main(style_args(moved, out, "--resume", "latest", "--steps", "5"), capsys)
    assert code == 2 and f"comes from a different run (--images '{trained[0].resolve()}' there, " in err
    assert loop.train(config(trained[0], out, steps=5, save_every=2, resume="latest"))["steps"] == 5
    assert resume_lines(capsys.readouterr().err) == []
    assert "dataset" in json.loads((out / run_folder.RUN_FILE).read_text())  # recorded from now on


def test_file_names_that_are_not_utf8_are_recorded_as_they_are(tmp_path, no_model):
    """Linux file names are bytes: run.json keeps them (as JSON escapes), so the next process reads the same
    fingerprint back."""
    images, out = style_folder(tmp_path), tmp_path / "out"
    odd = os.fsdecode(b"art_\xff.png")
    (images / "art_1.png").rename(images / odd)
    cfg = config(images, out).resolved()
    run_folder.write_run(cfg)
    recorded = json.loads((out / run_folder.RUN_FILE).read_bytes())["dataset"]
    assert odd in recorded and recorded == run_folder.fingerprint(cfg)
