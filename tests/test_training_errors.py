"""train/style.py's bad runs, as a user meets them: one line on stderr, exit code 2, and nothing loaded or written
first (flags, folders, output folders holding another run, resume points, missing packages or compilers, models that
cannot be fetched); and checkpoints left half-written by a kill are never resumed. Tiny model, CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import env, free_port, style_args, style_folder, style_main
from helpers import train_config as config

from sd_lora.training import UsageError, checkpoint, loop, prepare, run_folder

STYLE = Path(__file__).resolve().parent.parent / "train" / "style.py"


@pytest.fixture
def images(tmp_path) -> Path:
    return style_folder(tmp_path)


def test_a_folder_with_no_usable_image_stops_before_anything_loads_or_is_written(tmp_path, capsys, no_model):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    (folder / "b.jpg").write_text("not a jpeg")
    code, err = style_main(style_args(folder, tmp_path / "out"), capsys)
    assert code == 2 and "no usable image" in err
    assert not (tmp_path / "out").exists()


def test_an_output_folder_holding_a_different_run_is_refused(images, tmp_path, capsys, no_model):
    out = tmp_path / "out"
    run_folder.write_run(config(images, out, rank=8).resolved())
    (out / "inkwash.safetensors").write_bytes(b"its adapter")  # a finished run whose checkpoints were deleted
    code, err = style_main(style_args(images, out, "--rank", "4"), capsys)
    assert code == 2
    assert err.endswith(f"{out} holds a different run (--rank 8 there, 4 here); pass --overwrite to replace it, or "
                        "choose another --output")  # no "--resume latest": there is nothing to resume

    (out / "checkpoints" / "step-4").mkdir(parents=True)
    (out / "checkpoints" / "step-4" / checkpoint.STATE_FILE).write_text("{}")
    run_folder.write_run(config(images, out).resolved())
    code, err = style_main(style_args(images, out, "--steps", "3", "--sample-every", "0", "--save-every", "0"), capsys)
    assert code == 2 and "already holds this run, with checkpoints up to step 4" in err


def test_a_run_that_stopped_before_its_first_checkpoint_leaves_its_folder_free(images, tmp_path, capsys):
    """Killed or failed early, a run leaves run.json, logs and samples but no checkpoint and no adapter. The next run
    takes the folder over (it used to be refused as "a different run", with advice to resume it, which failed)."""
    out = tmp_path / "out"
    run_folder.write_run(config(images, out, rank=8).resolved())
    (out / "samples").mkdir()
    (out / "samples" / "step-000008.png").write_bytes(b"from the dead run")
    assert loop.train(config(images, out, rank=4, steps=2))["steps"] == 2
    assert json.loads((out / run_folder.RUN_FILE).read_text())["identity"]["rank"] == 4
    assert not (out / "samples" / "step-000008.png").exists() and (out / "inkwash.safetensors").is_file()


def test_a_diverged_run_stops_with_one_line_and_writes_no_adapter(images, tmp_path, capsys):
    """At --lr 1e30 without clipping the LoRA weights pass fp16's range within a few steps: every NaN-free step
    "succeeds", but the fp16 adapter would be full of Inf. The run stops at its first save, exit code 1."""
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(STYLE), *style_args(images, out, "--steps", "6", "--lr", "1e30",
                                                                 "--max-grad-norm", "0", "--sample-every", "0")],
                         check=False, capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=300)
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert last.startswith("style.py: error: the LoRA weights reached ") and "beyond fp16's 65504 at step 6" in last
    assert "lower --lr" in last
    assert not list(out.rglob("*.safetensors"))


@pytest.mark.parametrize("flag,where,message", [
    ("--output", "afile", "--output {}: is a file, not a folder"),
    ("--output", "afile/sub", "--output {}: cannot be made: {} is a file, not a folder"),
    ("--cache-dir", "afile", "--cache-dir {}: is a file, not a folder"),
    ("--cache-dir", "/proc/sd-lora-cache", "--cache-dir {}: cannot write in /proc"),
])
def test_an_output_or_cache_folder_that_cannot_be_made_is_refused_first(images, tmp_path, capsys, no_model, flag,
                                                                         where, message):
    """These used to fail after the model loaded, with a traceback, leaving run.json behind."""
    afile = tmp_path / "afile"
    afile.write_text("a file")
    path = where if where.startswith("/") else str(tmp_path / where)
    args = ["--output", str(tmp_path / "out"), flag, path] if flag != "--output" else ["--output", path]
    before = sorted(tmp_path.rglob("*"))
    code, err = style_main(["--images", str(images), "--model", "tiny", *args], capsys)
    assert code == 2 and err.startswith(f"style.py: error: {message.format(path, afile)}")
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, no probe left


def test_a_folder_name_that_is_not_utf8_still_trains(tmp_path, capsys):
    """Linux folder names are bytes. One that is not UTF-8 became a token the tokenizer rejected and a setting
    TensorBoard could not write (two tracebacks); its odd byte now reads as U+FFFD."""
    images = tmp_path / os.fsdecode(b"st\xffyle")
    style_folder(tmp_path).rename(images)
    result = loop.train(config(images, tmp_path / "out", steps=2, log_with="tensorboard"))
    assert result["adapter"].name == "st_yle.safetensors"
    assert "token 'st\ufffdyle'" in capsys.readouterr().out


def test_resume_with_nothing_to_resume_is_refused(images, tmp_path, capsys, no_model):
    code, err = style_main(style_args(images, tmp_path / "out", "--resume", "latest"), capsys)
    assert code == 2 and "--resume latest: " in err and "no checkpoint to resume" in err
    code, err = style_main(style_args(images, tmp_path / "out", "--resume", str(tmp_path)), capsys)
    assert code == 2 and "not a checkpoint folder" in err


def test_resume_from_a_different_run_is_refused(images, tmp_path, capsys, no_model):
    out = tmp_path / "out"
    folder = out / "checkpoints" / "step-4"
    folder.mkdir(parents=True)
    (folder / checkpoint.STATE_FILE).write_text("{}")
    (folder / run_folder.RUN_FILE).write_text(json.dumps({"identity": run_folder.identity(
        config(images, out, lr=3e-4).resolved())}))
    code, err = style_main(style_args(images, out, "--resume", "latest", "--steps", "50"), capsys)
    assert code == 2 and "comes from a different run (--lr 0.0003 there, 0.001 here)" in err


@pytest.mark.parametrize("flags,message", [
    (["--optimizer", "adamw8bit"], "--optimizer adamw8bit needs"),
    (["--attention", "xformers"], "--attention xformers"),
])
def test_cuda_only_features_give_a_clear_error_on_this_machine(images, tmp_path, capsys, no_model, flags, message):
    code, err = style_main(style_args(images, tmp_path / "out", *flags), capsys)
    assert code == 2 and message in err


def test_compile_without_a_cpp_compiler_gives_a_clear_error(images, tmp_path, capsys, no_model):
    from torch._inductor import config as inductor

    # inductor's own patch(): monkeypatch's undo left cpp.cxx deleted, breaking every later compile in the process
    with inductor.patch({"cpp.cxx": (None, str(tmp_path / "no-such-g++"))}):
        code, err = style_main(style_args(images, tmp_path / "out", "--compile"), capsys)
    assert code == 2 and "--compile on the CPU needs a C++ compiler" in err
    assert not (tmp_path / "out").exists()


def test_a_missing_model_suggests_the_tiny_one(images, tmp_path, capsys):
    code, err = style_main(["--images", str(images), "--output", str(tmp_path / "out"), "--model",
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


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_says_what_can_be_resumed_in_one_line(images, tmp_path, sig, code):
    """SIGTERM is how job schedulers preempt a run: it used to end with no word (exit 143) on what to resume."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(STYLE), *style_args(images, out, "--steps", "100000",
                                                                     "--save-every", "3", "--sample-every", "0")],
                            env=env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step-3").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == code and "Traceback" not in err
    last = err.strip().splitlines()[-1].split("\r")[-1]
    assert last.startswith("style.py: interrupted; checkpoints up to step ") and "--resume latest" in last
    step = int(last.split("up to step ")[1].split()[0])
    assert step >= 3 and (out / "checkpoints" / f"step-{step}" / checkpoint.STATE_FILE).is_file()


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_while_torch_loads_is_one_line(tmp_path, sig, code):
    """The imports at the top of style.py load torch, about a second: Ctrl-C there printed a page of traceback from
    inside torch, and SIGTERM ended the run without a word. The signal comes once torch's C core has loaded
    (`-X importtime` says when), so it lands in torch's Python imports: torch's C init swallows a Ctrl-C itself."""
    proc = subprocess.Popen([sys.executable, "-X", "importtime", str(STYLE), "--images", str(tmp_path / "none"),
                             "--model", "tiny"], env=env(), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.rsplit("|", 1)[-1].strip() == "torch._C":
            break
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    lines = [line for line in err.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == code, err[-3000:]
    assert lines == ["style.py: interrupted while starting; nothing to resume"], err[-3000:]
    assert list(tmp_path.iterdir()) == []


def test_sigterm_while_another_process_waits_to_report_a_bad_flag_is_one_line(tmp_path):
    """Under a multi-process launch the other processes wait before reporting a bad flag (the main one reports it);
    the launcher stops them with SIGTERM meanwhile, which gave a traceback from inside the wait."""
    proc = subprocess.Popen([sys.executable, str(STYLE), "--images", str(tmp_path), "--rank", "0"],
                            env=env(RANK="1"), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    started = time.monotonic()
    time.sleep(8)  # the imports take a few seconds; then it waits up to 20 s
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert time.monotonic() - started < 20  # stopped in the wait, before it reported the flag itself
    assert proc.returncode == 143 and err.splitlines() == ["style.py: interrupted while starting; nothing to resume"]


def test_a_size_far_above_what_the_model_can_use_gets_one_warning(pipe, tmp_path, capsys):
    """--resolution 4x the tiny model's 64 px costs 16x per step; --rank 48 is above the 32 inputs or outputs of
    some layers it trains, whose update cannot have a higher rank. Both still train, with one line each."""
    def warnings(**changes) -> list[str]:
        prepare.warn_sizes(config(tmp_path, tmp_path / "out", **changes), pipe)
        return capsys.readouterr().err.splitlines()

    assert warnings(resolution=256) == [("warning: --resolution 256: the model was trained at 64 px; memory and "
                                         "time per step grow with the square of the resolution: 16x the native "
                                         "size's here")]
    assert warnings(rank=48) == [(
        "warning: --rank 48 is above what 12 of the 36 layers it trains can use: a layer's update has a rank of at "
        "most min(in, out), 32 for unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q; rank beyond "
        "that adds parameters but no capacity")]
    assert "what all 96 layers it trains can use" in warnings(rank=100, targets="full")[0]
    assert "what 12 of the 28 layers" in warnings(rank=48, text_encoder=False)[0]  # the text encoder's are 64 wide
    assert warnings(resolution=64, rank=32) == warnings(resolution=96) == warnings() == []
    prepare.warn_sizes(config(tmp_path, tmp_path / "out", resolution=256, rank=48), pipe, notice=False)
    assert capsys.readouterr().err == ""  # the other processes of a multi-process run stay quiet


def test_a_run_with_a_rank_the_model_cannot_use_warns_and_trains(images, tmp_path, capsys):
    result = loop.train(config(images, tmp_path / "out", steps=1, rank=48))
    assert result["adapter"].exists()
    assert [line for line in capsys.readouterr().err.splitlines() if "warning: --rank 48" in line]


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


def test_a_bad_flag_under_a_multi_process_launch_is_reported_once(images, tmp_path):
    """Every process parses the flags; only the main one says what is wrong (the launcher then adds its own
    report of the failed processes)."""
    run = subprocess.run(
        [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
         "--main_process_port", str(free_port()), str(STYLE), *style_args(images, tmp_path / "out", "--rank", "0")],
        check=False, capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=300)
    assert run.returncode != 0
    assert run.stderr.count("style.py: error: ") == 1 and "--rank" in run.stderr
    assert not (tmp_path / "out").exists()
