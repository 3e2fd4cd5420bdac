"""sd_lora.training.config and train/style.py's flags: defaults as the issue states them, one clear error per bad
value, and exit code 2 for every bad flag or bad folder."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sd_lora.training import ConfigError, DatasetError, TrainConfig, UsageError
from sd_lora.training.config import add_arguments

REPO = Path(__file__).resolve().parent.parent
STYLE = REPO / "train" / "style.py"


def _load_script():
    """train/style.py is a script, not a package: load it by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_style", STYLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


style = _load_script()


def test_defaults_are_the_documented_ones():
    c = TrainConfig(images="x")
    assert (c.rank, c.alpha, c.targets, c.text_encoder) == (4, None, "cross-attn", True)
    assert (c.optimizer, c.lr_scheduler, c.warmup_steps, c.max_grad_norm) == ("adamw", "constant", 0, 1.0)
    r = c.resolved()
    assert (r.lr, r.te_lr) == (1e-4, 5e-5)  # for Stable Diffusion checkpoints ...
    tiny = TrainConfig(images="x", model="tiny").resolved()
    assert (tiny.lr, tiny.te_lr) == (1e-3, 1e-3)  # ... and more for the 1.4M-parameter tiny model
    assert TrainConfig(images="x", model="tiny", lr=2e-4).resolved().lr == 2e-4  # a flag always wins
    assert (c.steps, c.epochs, c.batch_size, c.grad_accum, c.seed) == (1000, None, 1, 1, 0)
    assert (c.num_class_images, c.prior_weight, c.flip, c.resolution, c.cache) == (100, 1.0, True, None, True)
    assert (c.sample_every, c.save_every, c.keep_checkpoints, c.attention) == (250, 250, 3, "sdpa")
    assert (c.save_format, c.dataset_metadata, c.mixed_precision) == ("kohya", True, "auto")
    assert c.model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert c.validate() is c


def test_resolved_fills_derived_defaults(tmp_path):
    c = TrainConfig(images=str(tmp_path / "mozart_art"), rank=8).resolved()
    assert c.token == "mozart_art" and c.name == "mozart_art"
    assert c.prompt == "an image in the style of mozart_art"
    assert c.output == os.path.join("output", "mozart_art") and c.alpha == 8.0
    assert c.class_images is None and not c.prior_preservation
    assert len(c.sample_prompts) == 2 and all("mozart_art" in p for p in c.sample_prompts)
    c = TrainConfig(images=str(tmp_path / "My Art"), token="zqx", prompt="{token} painting", alpha=1,
                    class_prompt="a painting", output=str(tmp_path / "out")).resolved()
    assert (c.token, c.name, c.prompt, c.alpha) == ("zqx", "zqx", "zqx painting", 1)
    assert c.class_images == str(tmp_path / "out" / "class_images") and c.prior_preservation
    assert TrainConfig(images=str(tmp_path / "My Art")).resolved().name == "My_Art"
    assert TrainConfig(images=str(tmp_path / "style v1.5")).resolved().name == "style_v1.5"  # dots are fine
    assert TrainConfig(images=str(tmp_path / "Run")).resolved().name == "Run_lora"  # not run.json's name


BAD = [
    ({"rank": 0}, "--rank: must be a positive integer (got 0)"),
    ({"rank": -2}, "--rank"),
    ({"lr": 0.0}, "--lr: must be greater than 0"),
    ({"te_lr": -1e-5}, "--te-lr"),
    ({"resolution": 100}, "--resolution: must be a positive multiple of 8 (got 100)"),
    ({"resolution": 0}, "--resolution"),
    ({"targets": "everything"}, "--targets: unknown value 'everything' (choose from cross-attn, attn, full)"),
    ({"optimizer": "sgd"}, "--optimizer: unknown value"),
    ({"lr_scheduler": "step"}, "--lr-scheduler"),
    ({"mixed_precision": "fp8"}, "--mixed-precision"),
    ({"attention": "flash"}, "--attention"),
    ({"save_format": "ckpt"}, "--save-format"),
    ({"log_with": "wandb"}, "--log-with"),
    ({"alpha": 0.0}, "--alpha"),
    ({"steps": 0}, "--steps"),
    ({"epochs": 0}, "--epochs"),
    ({"batch_size": 0}, "--batch-size"),
    ({"grad_accum": 0}, "--grad-accum"),
    ({"warmup_steps": -1}, "--warmup-steps"),
    ({"max_grad_norm": -1.0}, "--max-grad-norm"),
    ({"noise_offset": -0.1}, "--noise-offset"),
    ({"min_snr_gamma": 0.0}, "--min-snr-gamma"),
    ({"keep_checkpoints": 0}, "--keep-checkpoints"),
    ({"num_class_images": 0}, "--num-class-images"),
    ({"prior_weight": -1.0}, "--prior-weight"),
    ({"seed": -1}, "--seed"),
    ({"token": " "}, "--token: must not be empty"),
    ({"output": ""}, "--output: must not be empty"),  # wrote to output/<name> in the working folder
    ({"cache_dir": ""}, "--cache-dir: must not be empty"),
    ({"model": " "}, "--model: must not be empty"),
    ({"name": "a/b"}, "--name: must be usable as a file name"),
    ({"images": ""}, "--images: a folder of training images is required"),
    ({"class_images": "cls"}, "--class-images: needs --class-prompt"),
    ({"resume": "latest", "overwrite": True}, "--resume and --overwrite"),
    ({"sample_prompts": ("ok", "")}, "--sample-prompts"),
    ({"lr": float("inf")}, "--lr: must be a finite number"),  # trained on, then overflowed the fp16 adapter
    ({"te_lr": float("inf")}, "--te-lr: must be a finite number"),
    ({"alpha": float("inf")}, "--alpha: must be a finite number"),
    ({"noise_offset": float("inf")}, "--noise-offset: must be a finite number"),  # NaN loss, yet "done"
    ({"prior_weight": float("nan")}, "--prior-weight: must be a finite number"),
    ({"seed": 2**64}, "--seed: must be at most 4294967295"),  # torch's generators overflowed
    ({"name": "run"}, "--name: is reserved: <output>/run.json"),  # the A1111 sidecar run.json replaced the run file
    ({"name": ".."}, "--name: must not start with '.'"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[next(iter(c)) for c, _ in BAD])
def test_each_bad_value_gets_one_clear_error(change, message):
    config = dataclasses.replace(TrainConfig(images="x"), **change)
    with pytest.raises(ConfigError) as caught:
        config.validate()
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    assert isinstance(caught.value, UsageError)


def test_every_field_has_a_flag():
    import argparse

    parser = add_arguments(argparse.ArgumentParser())
    flags = {o for a in parser._actions for o in a.option_strings}
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in flags
    assert {"--no-text-encoder", "--no-flip", "--no-dataset-metadata", "--no-cache", "--overwrite"} <= flags


def test_help_gives_every_flag_that_has_a_default_its_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping: argparse would break "stable-diffusion" at its hyphen
    with pytest.raises(SystemExit):
        style.parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    import argparse

    for action in add_arguments(argparse.ArgumentParser())._actions:
        if action.default in (None, "", argparse.SUPPRESS) or action.required:
            continue  # --images (required), --epochs, --resume, ...: unset unless given
        assert "default" in action.help.lower(), action.option_strings
        assert " ".join(action.help.split()) in text  # what --help prints
    assert "--flip, --no-flip random horizontal flips (default: on)" in text
    assert "--overwrite, --no-overwrite replace an output folder that holds a different run (default: off)" in text


def test_flags_map_onto_the_config():
    c = style.parse(["--images", "imgs", "--rank", "8", "--te-lr", "1e-5", "--no-text-encoder", "--no-flip",
                     "--targets", "full", "--sample-prompts", "one", "two", "--resolution", "64", "--epochs", "2"])
    assert (c.images, c.rank, c.te_lr, c.text_encoder, c.flip, c.targets) == ("imgs", 8, 1e-5, False, False, "full")
    assert (c.sample_prompts, c.resolution, c.epochs) == (("one", "two"), 64, 2)
    assert style.parse(["--images", "imgs"]) == TrainConfig(images="imgs")


def test_steps_and_epochs_together_are_refused_not_silently_dropped(capsys, no_model):
    """--epochs decides a run's length; a --steps given with it used to be ignored without a word."""
    assert style.main(["--images", "x", "--steps", "500", "--epochs", "3"]) == 2
    assert capsys.readouterr().err == ("style.py: error: --steps 500 and --epochs 3 both say how long to train: "
                                       "pass one of them\n")
    assert style.main(["--images", "x", "--epochs", "3", "--steps", "1000"]) == 2  # the default's value, but given
    assert "pass one of them" in capsys.readouterr().err
    assert style.parse(["--images", "x", "--epochs", "3"]).steps == style.parse(["--images", "x"]).steps == 1000
    assert style.parse(["--images", "x", "--steps", "50"]).steps == 50
    assert TrainConfig(images="x", steps=500, epochs=3).validate().epochs == 3  # in Python, epochs still wins


@pytest.mark.parametrize("argv", [["--images", "x", "--rank", "0"], ["--images", "x", "--lr", "0"],
                                  ["--images", "x", "--resolution", "100"], ["--images", "x", "--targets", "all"],
                                  ["--images", "x", "--rank", "four"], ["--images", "x", "--bogus"], []])
def test_bad_flags_exit_2_with_one_line(argv, capsys):
    try:
        code = style.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("style.py: error: ") and err.count("\n") == 1


def test_usage_errors_from_the_run_exit_2(tmp_path, monkeypatch, capsys):
    """The loop raises DatasetError (empty folder) or UsageError (output holds another run); both end as exit 2."""
    from sd_lora.training import data

    (tmp_path / "empty").mkdir()

    def fake_train(config):
        data.scan_images(config.images, caption="x")

    monkeypatch.setattr("sd_lora.training.train", fake_train)
    assert style.main(["--images", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err == f"style.py: error: {tmp_path / 'empty'}: the folder is empty; put the training images " \
                  "(jpg, jpeg, png, webp, bmp) in it\n"
    assert issubclass(DatasetError, UsageError)


def test_the_script_exits_2_on_bad_flags_as_a_real_process():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(STYLE), "--images", "x", "--rank", "0", "--resolution", "64"],
                         check=False, capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=120)
    assert run.returncode == 2
    assert run.stderr == "style.py: error: --rank: must be a positive integer (got 0)\n"
    run = subprocess.run([sys.executable, str(STYLE), "--images", "x", "--optimizer", "sgd"],
                         check=False, capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "invalid choice: 'sgd'" in run.stderr
