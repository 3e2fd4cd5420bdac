"""--compile on the CPU: the training step runs through inductor's C++ code and must compute what eager computes.
torch 2.13's inductor with its default fusion did not (zero gradients for the tiny UNet's mid-block cross-attention
LoRA while the loss matched; bench/compile_cpu_check.py), so the trainer caps fusion (prepare.CPU_COMPILE_OPTIONS)
and these tests compare gradients, not only losses.

Tiny model, one thread, one image size (each new input shape compiles again: about 100 s on these 2 cores with a
cold inductor cache; the second test reuses the first one's cache).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import env, gradient_mismatches, step_gradients, style_args, train_config
from PIL import Image
from safetensors.torch import load_file

from sd_lora.training import loop, prepare

STYLE = Path(__file__).resolve().parent.parent / "train" / "style.py"

HAVE_CXX = prepare.have_cpp_compiler()  # without one, test_training_errors.py checks the error --compile gives

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="the CPU path; tests/test_training_gpu.py tests the GPU's")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch._dynamo.reset()


@pytest.fixture
def images(tmp_path) -> Path:
    """Three 64x64 images: one bucket, so one graph per model."""
    folder = tmp_path / "inkwash"
    folder.mkdir()
    for i in range(3):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"art_{i}.png")
    return folder


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler for inductor")
def test_the_compiled_cpu_step_computes_the_eager_gradients(images, tmp_path):
    """UNet and text encoder compiled (the default run trains both): the loss and every LoRA gradient of the first
    two batches match eager to fp32 rounding."""
    eager = step_gradients(images, tmp_path / "eager")
    compiled = step_gradients(images, tmp_path / "compiled", compile=True)
    np.testing.assert_allclose([loss for loss, _ in compiled], [loss for loss, _ in eager], rtol=1e-5)
    assert {name.split(".")[0] for name in eager[0][1]} == {"unet", "text_encoder"}
    assert not gradient_mismatches(eager, compiled, rtol=1e-3)


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler for inductor")
def test_style_py_compile_trains_what_eager_trains(images, tmp_path):
    """The command line with --compile: the start screen says it compiles, and the adapter is eager's."""
    out = tmp_path / "compiled"
    run = subprocess.run([sys.executable, str(STYLE), *style_args(images, out, "--steps", "3", "--compile",
                                                                   "--sample-every", "0", "--save-every", "0")],
                         check=False, capture_output=True, text=True, env=env(), timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "torch.compile: the first step of each bucket compiles" in run.stdout
    eager = loop.train(train_config(images, tmp_path / "eager", steps=3))
    assert eager["losses"]
    ours = load_file(str(out / "inkwash.safetensors"))
    theirs = load_file(str(tmp_path / "eager" / "inkwash.safetensors"))
    assert ours.keys() == theirs.keys()
    for key in ours:  # fp16 files; a LoRA that got no gradient would keep up = 0 where eager moved it by ~3e-4
        torch.testing.assert_close(ours[key].float(), theirs[key].float(), rtol=1e-2, atol=2e-5, msg=key)
