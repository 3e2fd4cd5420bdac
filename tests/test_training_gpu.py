"""The trainer on a CUDA GPU: fp16 by default with accelerate's loss scaling, frozen weights in fp16 and LoRA in fp32,
the VAE off the GPU once latents are cached, and the CUDA-only options (--attention xformers, --optimizer adamw8bit,
--compile through triton). CI has no GPU, so this whole file skips there; run it where there is one:

    HF_HUB_OFFLINE=1 python -m pytest -q tests/test_training_gpu.py

(bench/RESULTS.md records where it last ran.) Tiny model, as the CPU tests use.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    assert_diffusers_applies,
    env,
    gradient_mismatches,
    step_gradients,
    style_args,
    style_folder,
    train_config,
)
from safetensors import safe_open

import sd_lora
from sd_lora.training import UsageError, loop, prepare

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
STYLE = Path(__file__).resolve().parent.parent / "train" / "style.py"


@pytest.fixture
def images(tmp_path) -> Path:
    return style_folder(tmp_path)


@pytest.fixture(autouse=True)
def short_samples(monkeypatch):
    monkeypatch.setattr(loop, "SAMPLE_STEPS", 2)


def test_accelerate_launch_trains_in_fp16_on_the_gpu_and_diffusers_loads_the_adapter(images, tmp_path):
    """The README's command with no accelerate config file and no precision flag: fp16 on the GPU."""
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", str(STYLE),
         *style_args(images, out, "--steps", "20", "--lr", "2e-3", "--te-lr", "1e-3", "--sample-every", "10",
                     "--save-every", "10")],
        check=False, capture_output=True, text=True, env=env(HF_HOME=str(tmp_path / "hf_home")), cwd=tmp_path,
        timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "no CUDA GPU" not in run.stderr
    model_row = next(line for line in run.stdout.splitlines() if "frozen weights fp16, LoRA fp32" in line)
    assert "cuda" in model_row and "fp16 mixed precision" in model_row
    assert "GiB on " in run.stdout  # the end screen's peak VRAM
    with safe_open(str(out / "inkwash.safetensors"), "pt") as f:
        assert f.metadata()["ss_mixed_precision"] == "fp16"
        weights = {k: f.get_tensor(k) for k in list(f.keys())}
    assert all(torch.isfinite(w).all() for w in weights.values())
    for name in ("inkwash.preview.png", "loss.png", "samples/step-000010.png", "checkpoints/step-20"):
        assert (out / name).exists(), name

    assert_diffusers_applies(out / "inkwash.safetensors", device="cuda")


def test_fp16_keeps_frozen_weights_half_lora_fp32_and_the_vae_off_the_gpu(images, tmp_path):
    pipe = sd_lora.load_pipeline("tiny")
    result = loop.train(train_config(images, tmp_path / "out", steps=60, lr=3e-3, te_lr=1e-3), pipe=pipe)
    losses = result["losses"]
    assert len(losses) == 60 and all(math.isfinite(x) for x in losses) and result["skipped"] == 0
    assert np.mean(losses[-10:]) < 0.92 * np.mean(losses[:10])  # as the CPU test: same seed, same timesteps
    for model in (pipe.unet, pipe.text_encoder):
        trainable = {p for p in model.parameters() if p.requires_grad}
        assert trainable and {p.dtype for p in trainable} == {torch.float32}
        assert {p.dtype for p in model.parameters() if p not in trainable} == {torch.float16}
        assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert {p.device.type for p in pipe.vae.parameters()} == {"cpu"}  # latents were cached; sampling brought it back


def test_a_frozen_text_encoder_leaves_the_gpu_too(images, tmp_path):
    pipe = sd_lora.load_pipeline("tiny")
    loop.train(train_config(images, tmp_path / "out", steps=2, text_encoder=False), pipe=pipe)
    assert {p.device.type for p in pipe.text_encoder.parameters()} == {"cpu"}
    assert {p.device.type for p in pipe.unet.parameters()} == {"cuda"}


@pytest.mark.skipif(importlib.util.find_spec("xformers") is None, reason="xformers is not installed")
def test_xformers_attention_trains_what_sdpa_trains(images, tmp_path):
    """Where the installed xformers cannot run (a wheel built for another torch or CUDA), the run stops before it
    starts with one line that says so; where it can, it trains what sdpa trains."""
    problem = prepare.xformers_problem()
    if problem:
        with pytest.raises(UsageError, match=r"^--attention xformers: xformers is installed but cannot run here \("):
            loop.train(train_config(images, tmp_path / "xformers", steps=5, attention="xformers"))
        assert not (tmp_path / "xformers").exists()
        pytest.skip(f"xformers cannot run here ({problem}); its clear error was checked")
    sdpa = loop.train(train_config(images, tmp_path / "sdpa", steps=5))
    xformers = loop.train(train_config(images, tmp_path / "xformers", steps=5, attention="xformers"))
    np.testing.assert_allclose(xformers["losses"], sdpa["losses"], rtol=2e-2)  # fp16 attention kernels differ


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_adamw8bit_trains(images, tmp_path):
    pipe = sd_lora.load_pipeline("tiny")
    result = loop.train(train_config(images, tmp_path / "out", steps=60, lr=3e-3, te_lr=1e-3,
                                   optimizer="adamw8bit"), pipe=pipe)
    losses = result["losses"]
    assert all(math.isfinite(x) for x in losses) and np.mean(losses[-10:]) < 0.92 * np.mean(losses[:10])
    with safe_open(str(tmp_path / "out" / "inkwash.safetensors"), "pt") as f:
        assert f.metadata()["ss_optimizer"] == "bitsandbytes.optim.AdamW8bit"
        ups = [f.get_tensor(k) for k in list(f.keys()) if k.endswith("lora_up.weight")]
    assert ups and all(u.abs().max() > 0 for u in ups)  # LoRA's up matrices start at zero: the optimizer moved them


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_the_compiled_step_computes_the_eager_gradients(images, tmp_path):
    """--compile through triton: the same loss and the same LoRA gradients as eager, to fp16 rounding, for the run's
    first two batches (on the CPU, inductor zeroed some gradients while the loss still matched)."""
    eager = step_gradients(images, tmp_path / "eager")
    try:
        compiled = step_gradients(images, tmp_path / "compiled", compile=True)
    finally:
        torch._dynamo.reset()
    np.testing.assert_allclose([loss for loss, _ in compiled], [loss for loss, _ in eager], rtol=1e-2)
    assert not gradient_mismatches(eager, compiled, rtol=0.05)
