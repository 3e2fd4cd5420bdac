"""sd_lora.training.loop and checkpoint: what a user of train/style.py sees. A run through `accelerate launch` writes
an adapter diffusers loads; the loss falls; a run killed with SIGKILL and resumed ends bit for bit where an
uninterrupted one does; caching does not change the numbers. Bad runs: tests/test_training_errors.py.

Everything runs the tiny model on the CPU with one thread: with two threads on a busy 2-core machine, OpenMP makes
the tiny model 100x slower, and bit-for-bit comparisons need the same thread count in every process.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_diffusers_applies, env, multi_gpu, style_args, style_folder
from helpers import train_config as config
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import sd_lora
from sd_lora.training import checkpoint, loop, objective, prepare
from sd_lora.training.config import TrainingError

REPO = Path(__file__).resolve().parent.parent
STYLE = REPO / "train" / "style.py"


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(loop, "SAMPLE_STEPS", 2)  # sample images: 2 denoising steps are enough to test the path
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def images(tmp_path) -> Path:
    return style_folder(tmp_path)


def tensors(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------------
# End to end


def test_accelerate_launch_trains_an_adapter_that_diffusers_loads(images, tmp_path):
    """`accelerate launch` with no config file (a fresh HF_HOME), a folder with bad files in it, samples, TensorBoard
    and --save-format diffusers: everything lands in the output folder, and diffusers' own loader uses it."""
    out = tmp_path / "out"
    run = subprocess.run(
        [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "1", "--cpu", str(STYLE),
         *style_args(images, out, "--steps", "6", "--lr", "2e-3", "--te-lr", "1e-3", "--sample-every", "3",
                     "--save-every", "3", "--save-format", "diffusers", "--log-with", "tensorboard")],
        check=False, capture_output=True, text=True, env=env(HF_HOME=str(tmp_path / "hf_home")), cwd=tmp_path,
        timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for bad in ("empty.png", "broken.png", "notes.txt"):
        assert f"warning: skipped {bad}" in run.stderr
    assert "notice: no CUDA GPU" in run.stderr
    assert "sd-lora: training a style LoRA" in run.stdout and "sd-lora: done" in run.stdout

    adapter = out / "inkwash.safetensors"
    with safe_open(str(adapter), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
        dtypes = {f.get_tensor(k).dtype for k in keys if not k.endswith(".alpha")}
    assert dtypes == {torch.float16}
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    assert any(k.startswith("lora_unet_") and "attn2_to_k" in k for k in keys)
    assert not any("attn1" in k for k in keys)  # the cross-attn preset
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "4.0" and meta["ss_output_name"] == "inkwash"
    assert meta["modelspec.trigger_phrase"] == "inkwash" and meta["modelspec.resolution"] == "64x64"
    assert meta["ss_max_train_steps"] == "6" and meta["ss_learning_rate"] == "0.002"
    assert json.loads(meta["ss_tag_frequency"])["inkwash"]["an image in the style of inkwash"] == 3
    for name in ("inkwash.preview.png", "loss.png", "inkwash.json", "samples/step-000003.png",
                 "samples/step-000006.png", "diffusers/pytorch_lora_weights.safetensors", "checkpoints/step-3",
                 "checkpoints/step-6"):
        assert (out / name).exists(), name
    assert Image.open(out / "samples" / "step-000006.png").size == (128, 64)  # two prompts side by side
    assert list((out / "logs").rglob("events.out.tfevents.*"))

    assert_diffusers_applies(out / "inkwash.safetensors")


def test_a_precision_chosen_for_accelerate_launch_is_used_unless_the_trainer_is_told_otherwise(images, tmp_path):
    """`accelerate launch --mixed_precision bf16` (or an accelerate config that says bf16) trains in bf16 with the
    default --mixed-precision auto; an explicit --mixed-precision wins."""
    def model_row(*flags: str) -> str:
        run = subprocess.run(
            [str(Path(sys.executable).parent / "accelerate"), "launch", "--mixed_precision", "bf16",
             "--num_processes", "1", "--cpu", str(STYLE),
             *style_args(images, tmp_path / flags[-1], "--steps", "1", "--sample-every", "0", "--save-every", "0",
                         *flags)],
            check=False, capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        return next(line for line in run.stdout.splitlines() if line.strip().startswith("model "))

    assert "(cpu, bf16 mixed precision (frozen weights bf16, LoRA fp32))" in model_row("--mixed-precision", "auto")
    assert model_row("--mixed-precision", "no").endswith("(cpu, fp32)")


def test_accelerate_launch_multi_gpu_trains_in_two_processes_and_resumes_exactly(images, tmp_path):
    """The spec's own command, `accelerate launch --multi_gpu`, with two processes. With no GPU accelerate runs them
    on the CPU over gloo, through the same torch.distributed launcher it uses on GPUs: gradients are averaged over
    both, each process saves its RNG state in the checkpoint, and the main process alone prints and writes.
    Resumed from its step-2 checkpoint, the run ends bit for bit where it did: each process gets its own noise back,
    not the main process's."""
    out = tmp_path / "out"
    run = multi_gpu(images, out, tmp_path, "--steps", "4", "--save-every", "2", "--cache-dir", str(tmp_path / "c"))
    assert run.stdout.count("sd-lora: training a style LoRA") == 1 and run.stdout.count("sd-lora: done") == 1
    assert "4 × 2 images (batch 1 × grad-accum 1 × 2 processes)" in run.stdout
    assert run.stderr.count("warning: skipped empty.png") == 1
    step = out / "checkpoints" / "step-2"
    assert (step / "random_states_0.pkl").is_file() and (step / "random_states_1.pkl").is_file()

    resumed = tmp_path / "resumed"
    multi_gpu(images, resumed, tmp_path, "--steps", "4", "--save-every", "0", "--resume", str(step))
    assert same_tensors(tensors(out / "inkwash.safetensors"), tensors(resumed / "inkwash.safetensors"))


def test_an_output_folder_inside_the_images_folder_is_not_trained_on(images, tmp_path, capsys):
    """--output inside --images: a resumed run used to scan the preview, samples, loss plot and checkpoints as
    training data (and warn about each). The name has dots, as shared files' names often do ("v1.5")."""
    out = images / "lora"
    loop.train(config(images, out, steps=2, save_every=2, sample_every=1, name="inkwash.v1.5"))
    first = capsys.readouterr()
    result = loop.train(config(images, out, steps=4, save_every=2, sample_every=1, name="inkwash.v1.5",
                               resume="latest"))
    again = capsys.readouterr()
    rows = [next(line for line in o.out.splitlines() if line.strip().startswith("images ")) for o in (first, again)]
    assert rows[0] == rows[1] and rows[0].split()[1] == "4"
    assert "lora" not in again.err.replace(str(images), "")  # no warning about anything the run wrote
    assert result["adapter"] == out / "inkwash.v1.5.safetensors" and result["steps"] == 4
    assert_diffusers_applies(result["adapter"])


def test_the_loss_falls_over_the_run(images, tmp_path):
    result = loop.train(config(images, tmp_path / "out", steps=60, lr=3e-3, te_lr=1e-3))
    losses = result["losses"]
    assert len(losses) == 60 and all(math.isfinite(x) for x in losses) and result["skipped"] == 0
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])  # same timesteps every run: the seed fixes them
    assert last < 0.92 * first, (first, last)
    assert (tmp_path / "out" / "loss.png").is_file()


def test_kill_9_then_resume_latest_ends_bit_for_bit_where_an_uninterrupted_run_does(images, tmp_path):
    """With a warmup and a cosine schedule, so the resumed schedule must pick up where it stopped."""
    flags = ["--steps", "30", "--save-every", "4", "--sample-every", "0", "--lr", "1e-3", "--lr-scheduler", "cosine",
             "--warmup-steps", "5"]
    same = {"steps": 30, "save_every": 4, "lr": 1e-3, "lr_scheduler": "cosine", "warmup_steps": 5}
    whole = tmp_path / "whole"
    loop.train(config(images, whole, **same))

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(STYLE), *style_args(images, killed, *flags)], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "step-8").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "inkwash.safetensors").exists(), "the run finished before it could be killed"
    steps = [s for s, _ in checkpoint.checkpoints(killed)]
    assert 8 in steps and max(steps) < 30

    result = loop.train(config(images, killed, **same, resume="latest"))
    assert result["steps"] == 30
    assert same_tensors(tensors(killed / "inkwash.safetensors"), tensors(whole / "inkwash.safetensors"))
    assert [s for s, _ in checkpoint.checkpoints(killed)] == [24, 28, 30]  # --keep-checkpoints 3


def test_prior_preservation_generates_class_images_and_trains(images, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"identity": {"rank": 8}}))  # a different run, replaced on request
    (out / "checkpoints" / "step-5").mkdir(parents=True)
    result = loop.train(config(images, out, steps=2, class_prompt="a painting", num_class_images=2, overwrite=True))
    assert result["steps"] == 2 and all(math.isfinite(x) for x in result["losses"])
    assert sorted(p.name for p in (out / "class_images").iterdir()) == ["class-00000.png", "class-00001.png"]
    assert "2 class images of 'a painting'" in capsys.readouterr().out
    assert not (out / "checkpoints" / "step-5").exists()


def test_first_step_loss_is_the_same_with_caching_on_and_off(images, tmp_path):
    """Latents from the RAM cache, the disk cache and live VAE encodes, and text embeddings cached or encoded live,
    give the same numbers bit for bit; so does gradient checkpointing."""
    runs = {
        "ram": {}, "disk": {"cache_dir": str(tmp_path / "cache")}, "live": {"cache": False},
        "checkpointing": {"gradient_checkpointing": True},
    }
    losses = {name: loop.train(config(images, tmp_path / name, steps=2, text_encoder=False, **changes))["losses"]
              for name, changes in runs.items()}
    assert losses["ram"][0] == losses["disk"][0] == losses["live"][0] == losses["checkpointing"][0]
    assert losses["ram"] == losses["disk"] == losses["live"] == losses["checkpointing"]
    assert list((tmp_path / "cache").glob("*.safetensors"))
    assert same_tensors(tensors(tmp_path / "ram" / "inkwash.safetensors"),
                        tensors(tmp_path / "live" / "inkwash.safetensors"))


def test_gradient_checkpointing_covers_a_trained_text_encoder_and_changes_no_number(images, tmp_path, recwarn):
    pipe = sd_lora.load_pipeline("tiny")
    on = loop.train(config(images, tmp_path / "on", steps=2, gradient_checkpointing=True), pipe=pipe)
    assert not [str(w.message) for w in recwarn if issubclass(w.category, FutureWarning)]  # transformers 5 renamed it
    for model in (pipe.unet, pipe.text_encoder):
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()), type(model).__name__
    off = loop.train(config(images, tmp_path / "off", steps=2))
    assert on["losses"] == off["losses"]
    assert same_tensors(tensors(tmp_path / "on" / "inkwash.safetensors"),
                        tensors(tmp_path / "off" / "inkwash.safetensors"))


# ---------------------------------------------------------------------------------------------------------------
# The step: precision, NaN handling, loss variants, schedules, run length


def test_bf16_keeps_frozen_weights_low_and_lora_fp32_and_samples_cast_nothing(images, tmp_path):
    pipe = sd_lora.load_pipeline("tiny")
    result = loop.train(config(images, tmp_path / "out", steps=2, mixed_precision="bf16"), pipe=pipe)
    assert all(math.isfinite(x) for x in result["losses"])
    trainable = {p for p in pipe.unet.parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert {p.dtype for p in pipe.unet.parameters() if p not in trainable} == {torch.bfloat16}
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.bfloat16}
    assert (tmp_path / "out" / "inkwash.preview.png").is_file()  # sampled at the end, after which the above held


def test_nan_steps_are_skipped_and_counted_and_ten_in_a_row_stop_the_run(images, tmp_path, monkeypatch):
    real = loop.diffusion_loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] in nan_calls else loss

    monkeypatch.setattr(loop, "diffusion_loss", sometimes_nan)
    nan_calls = {2}
    result = loop.train(config(images, tmp_path / "one", steps=4))
    assert result["skipped"] == 1 and math.isnan(result["losses"][1]) and result["steps"] == 4
    assert all(torch.isfinite(t).all() for t in tensors(tmp_path / "one" / "inkwash.safetensors").values())

    calls["n"], nan_calls = 0, set(range(100))
    with pytest.raises(TrainingError, match="NaN or Inf for 10 steps in a row"):
        loop.train(config(images, tmp_path / "all", steps=20))


def test_v_prediction_min_snr_and_noise_offset():
    """The target follows the scheduler's prediction type; Min-SNR weights min(snr, γ)/snr (epsilon) or
    min(snr, γ)/(snr + 1) (v-prediction)."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    def zero(x, t, encoder_hidden_states):  # a "UNet" that predicts 0: the loss is the target's mean square
        return SimpleNamespace(sample=torch.zeros_like(x))

    tiny_config = DDPMScheduler.load_config(sd_lora.tiny_dir() / "scheduler")

    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for kind in ("epsilon", "v_prediction"):
        scheduler = DDPMScheduler.from_config(tiny_config, prediction_type=kind)
        plain = objective.diffusion_loss(zero, scheduler, latents, None, torch.Generator().manual_seed(0))
        weighted = objective.diffusion_loss(zero, scheduler, latents, None, torch.Generator().manual_seed(0),
                                       min_snr_gamma=5.0)
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (2,), generator=g)
        target = noise if kind == "epsilon" else scheduler.get_velocity(latents, noise, t)
        torch.testing.assert_close(plain, target.pow(2).mean(dim=(1, 2, 3)))
        snr = scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])
        weight = snr.clamp(max=5.0) / (snr if kind == "epsilon" else snr + 1)
        torch.testing.assert_close(weighted, plain * weight)
    offset = objective.diffusion_loss(zero, scheduler, latents, None, torch.Generator().manual_seed(0), noise_offset=0.1)
    assert not torch.equal(offset, plain)


def test_learning_rate_schedules_warm_up_then_decay():
    constant = prepare.lr_factor("constant", 4, 20)
    assert [constant(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    linear, cosine = prepare.lr_factor("linear", 0, 10), prepare.lr_factor("cosine", 2, 12)
    assert linear(0) == 1.0 and linear(5) == 0.5 and linear(10) == 0.0
    assert cosine(2) == 1.0 and cosine(7) == pytest.approx(0.5) and cosine(12) == pytest.approx(0.0)


def test_epochs_override_steps_with_batches_and_accumulation(images, tmp_path):
    """4 images in 2 buckets of 2, batch 2: 2 batches per epoch; with --grad-accum 2, one step per epoch."""
    result = loop.train(config(images, tmp_path / "out", steps=1000, epochs=2, batch_size=2, grad_accum=2))
    assert result["steps"] == 2


def test_the_start_screen_counts_the_images_a_step_really_takes(images, tmp_path, capsys):
    """--batch-size 3 on 2 buckets of 2 images: every batch holds 2 images, and the screen says so (it said 3)."""
    loop.train(config(images, tmp_path / "out", steps=1, batch_size=3))
    out = capsys.readouterr().out
    assert "1 × 2 images (batch 3 × grad-accum 1 × 1 process) = 0.5 epochs" in out, out
    (images / "art_3.png").unlink()  # buckets of 2 and 1 image: batches of 2 and 1
    loop.train(config(images, tmp_path / "out3", steps=1, batch_size=2))
    assert "1 × 1.5 images on average (batch 2 × grad-accum 1 × 1 process)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# Other models and captions


def test_a_half_precision_model_folder_trains_on_the_cpu(images, tmp_path):
    """A diffusers folder saved in fp16 (what `sd-lora merge` and most downloads give) trains in fp32 on the CPU."""
    from sd_lora.checkpoint import write_folder

    folder = write_folder(sd_lora.load_pipeline("tiny"), tmp_path / "tiny_fp16", torch.float16)
    pipe = sd_lora.load_pipeline(str(folder))
    assert all(p.requires_grad for p in pipe.unet.parameters())  # as diffusers' from_pretrained leaves them
    result = loop.train(config(images, tmp_path / "out", model=str(folder), steps=2), pipe=pipe)
    assert len(result["losses"]) == 2 and all(math.isfinite(x) for x in result["losses"])
    trained = {p for m in (pipe.unet, pipe.text_encoder, pipe.vae) for p in m.parameters() if p.requires_grad}
    assert trained and all(p.dtype == torch.float32 and p.numel() < 10_000 for p in trained)  # LoRA matrices only
    frozen = [p for p in pipe.unet.parameters() if p not in trained]
    assert frozen and all(p.grad is None for p in frozen)


def test_a_caption_longer_than_the_text_encoder_window_is_named_in_a_warning(images, tmp_path, capsys):
    (images / "art_1.txt").write_text("a blue circle, " + "with a very long ornate golden frame " * 12)
    loop.train(config(images, tmp_path / "out", steps=1))
    err = capsys.readouterr().err
    assert "warning: 1 caption(s) are longer than the text encoder's 77 tokens" in err
    assert "a blue circle, with a very long ornate" in err
