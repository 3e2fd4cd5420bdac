"""train/style.py's bad runs, as a user meets them: one line on stderr, exit code 2, and nothing loaded or written
first (flags, folders, output folders holding another run, resume points, missing packages or compilers, models that
cannot be fetched); and checkpoints left half-written by a kill are never resumed. Tiny model, CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import env, style_args, style_folder
from helpers import train_config as config

import sd_lora
from sd_lora.training import UsageError, checkpoint, loop

STYLE = Path(__file__).resolve().parent.parent / "train" / "style.py"


@pytest.fixture
def images(tmp_path) -> Path:
    return style_folder(tmp_path)



def _main(argv, capsys) -> tuple[int, str]:
    """Run train/style.py's main; return the exit code and its one error line (skipped-file warnings aside)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_style", STYLE)
    style = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(style)
    code = style.main(argv)
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning: ")]
    assert len(errors) == 1 and errors[0].startswith("style.py: error: "), errors
    return code, errors[0]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model gets loaded: these errors must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(sd_lora, "load_pipeline", refuse)


def test_a_folder_with_no_usable_image_stops_before_anything_loads_or_is_written(tmp_path, capsys, no_model):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    (folder / "b.jpg").write_text("not a jpeg")
    code, err = _main(style_args(folder, tmp_path / "out"), capsys)
    assert code == 2 and "no usable image" in err
    assert not (tmp_path / "out").exists()


def test_an_output_folder_holding_a_different_run_is_refused(images, tmp_path, capsys, no_model):
    out = tmp_path / "out"
    checkpoint.write_run(config(images, out, rank=8).resolved())
    code, err = _main(style_args(images, out, "--rank", "4"), capsys)
    assert code == 2
    assert f"{out} holds a different run (--rank 8 there, 4 here)" in err and "--overwrite" in err

    (out / "checkpoints" / "step-4").mkdir(parents=True)
    (out / "checkpoints" / "step-4" / checkpoint.STATE_FILE).write_text("{}")
    checkpoint.write_run(config(images, out).resolved())
    code, err = _main(style_args(images, out, "--steps", "3", "--sample-every", "0", "--save-every", "0"), capsys)
    assert code == 2 and "already holds this run, with checkpoints up to step 4" in err


def test_resume_with_nothing_to_resume_is_refused(images, tmp_path, capsys, no_model):
    code, err = _main(style_args(images, tmp_path / "out", "--resume", "latest"), capsys)
    assert code == 2 and "--resume latest: " in err and "no checkpoint to resume" in err
    code, err = _main(style_args(images, tmp_path / "out", "--resume", str(tmp_path)), capsys)
    assert code == 2 and "not a checkpoint folder" in err


def test_resume_from_a_different_run_is_refused(images, tmp_path, capsys, no_model):
    out = tmp_path / "out"
    folder = out / "checkpoints" / "step-4"
    folder.mkdir(parents=True)
    (folder / checkpoint.STATE_FILE).write_text("{}")
    (folder / checkpoint.RUN_FILE).write_text(json.dumps({"identity": checkpoint.identity(
        config(images, out, lr=3e-4).resolved())}))
    code, err = _main(style_args(images, out, "--resume", "latest", "--steps", "50"), capsys)
    assert code == 2 and "comes from a different run (--lr 0.0003 there, 0.001 here)" in err


@pytest.mark.parametrize("flags,message", [
    (["--optimizer", "adamw8bit"], "--optimizer adamw8bit needs"),
    (["--attention", "xformers"], "--attention xformers"),
])
def test_cuda_only_features_give_a_clear_error_on_this_machine(images, tmp_path, capsys, no_model, flags, message):
    code, err = _main(style_args(images, tmp_path / "out", *flags), capsys)
    assert code == 2 and message in err


def test_compile_without_a_cpp_compiler_gives_a_clear_error(images, tmp_path, capsys, no_model):
    from torch._inductor import config as inductor

    # inductor's own patch(): monkeypatch's undo left cpp.cxx deleted, breaking every later compile in the process
    with inductor.patch({"cpp.cxx": (None, str(tmp_path / "no-such-g++"))}):
        code, err = _main(style_args(images, tmp_path / "out", "--compile"), capsys)
    assert code == 2 and "--compile on the CPU needs a C++ compiler" in err
    assert not (tmp_path / "out").exists()


def test_a_missing_model_suggests_the_tiny_one(images, tmp_path, capsys):
    code, err = _main(["--images", str(images), "--output", str(tmp_path / "out"), "--model",
                       str(tmp_path / "nowhere.safetensors")], capsys)
    assert code == 2 and "--model tiny" in err and "nowhere.safetensors" in err
    with pytest.raises(UsageError, match="--model tiny"):
        loop.train(config(images, tmp_path / "out2", model="no-such-user/no-such-model"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


@pytest.mark.parametrize("hub,problem", [
    ({"HF_HUB_OFFLINE": "1"},
     "not in the local Hugging Face cache, and the hub is switched off (HF_HUB_OFFLINE is set)"),
    ({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},
     "not in the local Hugging Face cache, and the hub cannot be reached ([Errno 111] Connection refused)"),
])
def test_a_hub_model_that_cannot_be_fetched_is_one_line_on_stderr(images, tmp_path, hub, problem):
    """Everything the user sees, in a fresh process with transformers' and diffusers' logging as they come: no
    "Couldn't connect to the Hub" notice, no torchvision notice, no traceback; only the skipped-file warnings."""
    run = subprocess.run([sys.executable, str(STYLE), "--images", str(images), "--output", str(tmp_path / "out"),
                          "--model", "no-such-user/no-such-model"], check=False, capture_output=True, text=True,
                         env={**env(HF_HOME=str(tmp_path / "hf_home"), **hub), "TRANSFORMERS_VERBOSITY": "warning"},
                         timeout=120)
    lines = [line for line in run.stderr.splitlines() if not line.startswith("warning: skipped ")]
    expected = (f"style.py: error: --model: no-such-user/no-such-model: {problem}; offline, use --model tiny (the "
                "built-in model), a local diffusers folder or a .safetensors checkpoint")
    assert run.returncode == 2 and lines == [expected], run.stderr
    assert not (tmp_path / "out").exists()


def test_a_half_written_checkpoint_is_never_resumed(images, tmp_path):
    """A save killed midway leaves a hidden temporary folder, which --resume latest ignores and the next run
    removes; a kill mid-delete leaves a hidden folder too."""
    root = tmp_path / "out" / "checkpoints"
    for name in ("step-4", ".step-8.tmp", ".step-2.deleting"):
        (root / name).mkdir(parents=True)
    (root / "step-4" / checkpoint.STATE_FILE).write_text("{}")
    (root / ".step-8.tmp" / checkpoint.STATE_FILE).write_text("{}")
    assert checkpoint.find_checkpoint("latest", tmp_path / "out") == root / "step-4"
    checkpoint.remove_stale(tmp_path / "out")
    assert sorted(p.name for p in root.iterdir()) == ["step-4"]
