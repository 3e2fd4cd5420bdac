"""Shared test helpers: random adapters shaped like trained ones, model outputs to compare, and a small style folder
with a training config for the trainer's tests."""

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from sd_lora.targets import preset_paths
from sd_lora.training import TrainConfig
from sd_lora.weights import AdapterWeights, LoRAModule

STYLE = Path(__file__).resolve().parent.parent / "train" / "style.py"


def random_adapter(pipe, preset="full", rank=4, seed=0, alphas="varied", parts=("unet", "text_encoder"),
                   scale=0.1) -> AdapterWeights:
    """An adapter with random up AND down (a trained-looking one), alphas differing per module when 'varied'."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for part in parts:
        model = getattr(pipe, part)
        for i, path in enumerate(preset_paths(model, part, preset)):
            base = model.get_submodule(path if part == "unet" else _real(model, path))
            if isinstance(base, torch.nn.Conv2d):
                down = torch.randn(rank, base.in_channels, *base.kernel_size, generator=g)
                up = torch.randn(base.out_channels, rank, 1, 1, generator=g)
            else:
                down = torch.randn(rank, base.in_features, generator=g)
                up = torch.randn(base.out_features, rank, generator=g)
            alpha = {"varied": float(1 + i % 5), "none": None}.get(alphas, alphas)
            modules[f"{part}.{path}"] = LoRAModule(down * scale, up * scale, alpha)
    return AdapterWeights(modules, family="sd1", format="kohya")


def with_conv_module(pipe, adapter: AdapterWeights, conv: str, rank: int = 2, seed: int = 0) -> AdapterWeights:
    """`adapter` plus a rank-`rank` update of the kxk conv `conv` ("unet.up_blocks.1.resnets.0.conv2"): a LoCon
    module, as extract --conv-rank should recover."""
    weight = pipe.unet.get_submodule(conv.removeprefix("unet.")).weight
    g = torch.Generator().manual_seed(seed)
    adapter.modules[conv] = LoRAModule(torch.randn(rank, *weight.shape[1:], generator=g) * 0.1,
                                       torch.randn(weight.shape[0], rank, 1, 1, generator=g) * 0.1, float(rank))
    return adapter


def _real(model, path):
    names = dict(model.named_modules())
    return path if path in names else "text_model." + path


def unet_out(pipe, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    ctx = torch.randn(batch, 77, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return pipe.unet(x, 500, encoder_hidden_states=ctx).sample


def te_out(pipe, prompts=("a red circle on a blue background", "a mozart style star")):
    ids = pipe.tokenizer(list(prompts), padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def generate(pipe, prompt="a red circle", seed=0, steps=3, **kw):
    return pipe(prompt, num_inference_steps=steps, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(seed), **kw).images


def assert_diffusers_applies(adapter: Path, device: str = "cpu") -> None:
    """diffusers' own loader (`load_lora_weights`) takes the trained file, and it changes the tiny model's image."""
    import numpy as np

    import sd_lora

    pipe = sd_lora.load_pipeline("tiny").to(device)
    prompt = "a portrait in the style of inkwash"
    base = generate(pipe, prompt)
    # PEFT refuses dots in adapter names ("style.v1.5"), so a diffusers user renames; sd_lora takes them as they are
    pipe.load_lora_weights(str(adapter.parent), weight_name=adapter.name, adapter_name=adapter.stem.replace(".", "_"))
    styled = generate(pipe, prompt)
    assert np.isfinite(styled).all() and np.abs(styled - base).max() > 1e-3


def style_folder(tmp_path: Path) -> Path:
    """A style folder of four images in two aspect ratios (one with a caption), plus a zero-byte file, a corrupt
    PNG and a stray text file, which the run must skip."""
    folder = tmp_path / "inkwash"
    folder.mkdir()
    for i in range(4):
        image = Image.new("RGB", (64, 64) if i % 2 == 0 else (96, 64), (235, 225, 200))
        draw = ImageDraw.Draw(image)
        draw.rectangle((2, 2, image.width - 3, image.height - 3), outline=(120, 90, 20), width=4)
        draw.ellipse((14 + 4 * i, 16, 44 + 4 * i, 48), fill=(40 * i, 70, 200), outline=(10, 10, 10), width=2)
        image.save(folder / f"art_{i}.png")
    (folder / "art_0.txt").write_text("a blue circle, ink outline")
    (folder / "empty.png").write_bytes(b"")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (folder / "notes.txt").write_text("not a caption")
    return folder


def train_config(images: Path, output: Path, **changes) -> TrainConfig:
    """The tiny model for 3 steps, no samples, checkpoints or logs unless `changes` ask for them."""
    base = TrainConfig(images=str(images), model="tiny", output=str(output), steps=3, sample_every=0, save_every=0,
                       log_with="none")
    return dataclasses.replace(base, **changes)


def env(**extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", **extra}


def style_args(images: Path, output: Path, *flags: str) -> list[str]:
    return ["--images", str(images), "--model", "tiny", "--output", str(output), "--log-with", "none", *flags]


def style_main(argv: list[str], capsys, model_loads: bool = False) -> tuple[int, str]:
    """Run train/style.py's main in this process; return the exit code and its one error line. Skipped-file warnings
    aside, it is all stderr holds, unless `model_loads`: then the CPU notice and progress bars come first."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_style", STYLE)
    style = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(style)
    code = style.main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning: ")]
    errors = [line for line in lines if line.startswith("style.py: error: ")] if model_loads else lines
    assert len(errors) == 1 and errors[0].startswith("style.py: error: ") and lines[-1] == errors[0], lines
    return code, errors[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multi_gpu(images: Path, out: Path, cwd: Path, *flags: str) -> subprocess.CompletedProcess:
    """train/style.py through `accelerate launch --multi_gpu --num_processes 2` (on the CPU over gloo here); it must
    succeed."""
    run = subprocess.run(
        [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
         "--main_process_port", str(free_port()), str(STYLE),
         *style_args(images, out, "--sample-every", "0", "--lr", "1e-3", *flags)],
        check=False, capture_output=True, text=True, env=env(), cwd=cwd, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def step_gradients(images: Path, output: Path, steps: int = 2, **changes) -> list[tuple[float, dict]]:
    """(loss, {parameter name: gradient}) for the first `steps` batches of a run's Trainer, no optimizer step: what
    one step computes, to compare a compiled step with an eager one exactly where it matters."""
    from accelerate.state import AcceleratorState, GradientState

    import sd_lora
    from sd_lora.training import loop, prepare
    from sd_lora.training.buckets import assign_buckets
    from sd_lora.training.data import scan_images

    cfg = train_config(images, output, **changes).resolved()
    pipe = sd_lora.load_pipeline("tiny")
    accelerator = prepare.make_accelerator(cfg, notice=False)
    pipe.to(accelerator.device)
    pipe.to(dtype=prepare.weight_dtype(accelerator))
    resolution = prepare.native_resolution(pipe)
    records = assign_buckets(scan_images(images, cfg.prompt, cfg.token, warn=None), resolution)
    trainer = loop.Trainer(cfg, pipe, records, [], accelerator, resolution)
    names = {id(p): f"{part}.{n}" for part in ("unet", "text_encoder")
             for n, p in getattr(pipe, part).named_parameters() if p.requires_grad}
    results = []
    try:
        for _ in range(steps):
            with accelerator.autocast():
                loss = trainer.loss(next(trainer.batches))
            loss.backward()
            results.append((loss.item(), {names[id(p)]: p.grad.float().cpu() for p in trainer.params}))
            trainer.optimizer.zero_grad(set_to_none=True)
    finally:
        AcceleratorState._reset_state()
        GradientState._reset_state()
    return results


def gradient_mismatches(eager: list, compiled: list, rtol: float) -> list[str]:
    """Parameters whose compiled gradient differs from the eager one by more than rtol of the eager gradient's norm
    (a zero gradient where eager has one always counts)."""
    bad = []
    for step, ((_, a), (_, b)) in enumerate(zip(eager, compiled)):
        for name, g in a.items():
            norm, off = float(g.norm()), float((b[name] - g).norm())
            if norm and off > rtol * norm:
                bad.append(f"step {step}: {name} ({off / norm:.3g})")
    return bad
