"""Training-step benchmark (issue 3): our LoRA training step (sd_lora.training.loop.Trainer.step, the code the trainer
runs) against a reference step written the way diffusers' examples/dreambooth/train_dreambooth_lora.py trains, and
against a full fine-tuning step of the same UNet. CPU, fp32, batch 1, AdamW, rank 4.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/train_step.py                   # tiny, then SD1.5 architecture
    HF_HUB_OFFLINE=1 .venv/bin/python bench/train_step.py --models tiny     # seconds
    HF_HUB_OFFLINE=1 .venv/bin/python bench/train_step.py --models tiny --compile   # + ours with --compile (minutes)

Models: the built-in tiny model at its native 64 px, and the SD1.5 architecture (UNet ~860M, CLIP-L, SD1.5 VAE, all
from their public configs with random weights) at 256 px, i.e. a 32x32 latent.

What is timed, per optimizer step (images/s = 1 / seconds at batch 1):
- ours, caching on: the default run (cross-attn preset: UNet attn2 q/k/v/out + CLIP self-attn q/k/v/out, text
  encoder trained, so it runs every step): latents sampled from the cached VAE distribution.
- ours, caching off: the same Trainer with the VAE encoding the image (read from disk) every step.
- reference: the dreambooth-LoRA step with --train_text_encoder: image read and transformed, VAE encode, PEFT LoRA on
  the same modules and rank (diffusers' add_adapter + LoraConfig, gaussian init), text encoder forward, UNet, MSE,
  backward, clip_grad_norm_, AdamW, scheduler. It runs on a deep copy of the UNet (same weights), so ours and the
  reference alternate step by step.
- LoRA vs full fine-tuning, on equal inputs (cached latents and text embeddings): ours with --no-text-encoder against
  a step that trains every UNet weight (on the UNet copy). Tiny: torch's fused AdamW. SD1.5: the same AdamW update applied to each weight as soon
  as its gradient is ready (optimizer in backward) with the moments in a reused scratch buffer, because 860M weights'
  gradients and AdamW moments (10 GB) do not fit next to the other jobs on this 24 GiB machine; it does the same
  arithmetic per weight, skips gradient clipping and touches less memory than torch's AdamW, so if anything it flatters
  the full step. Its gradient + optimizer memory is what a real full fine-tune holds: 12 bytes per weight (fp32
  gradient, exp_avg, exp_avg_sq).

Allocator: on the CPU, train() makes glibc keep freed memory (sd_lora.training.host_memory), which is process-wide.
So by default the benchmark runs itself twice, in fresh processes: `--allocator default` (glibc as it comes, what
diffusers' script gets) and `--allocator trainer` (train()'s setting); each compares ours with the peers in that
process, and a final "as run" section sets ours (trainer setting) against the reference (default).

Variants that are compared take turns step by step (the order rotating), after three warm-up steps each; numbers are
medians, ratios medians of per-turn ratios (and, since interference from other jobs only ever slows a step down, the
ratio of the fastest steps too). Goals: caching on >= 1.5x the reference's images/s, caching off >= 1.0x; LoRA step >= 1.25x faster
than the full step with <= 1/3 of its gradient + optimizer memory.

--compile adds ours with --compile (inductor compiles the UNet and the text encoder; caching on) against the
reference, taking turns as above; its first step, which compiles, is timed on its own. Inductor keeps what it compiled
in its on-disk cache (TORCHINDUCTOR_CACHE_DIR), so a later process compiles the same graphs much faster.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import clip_l, machine, median, sd15_unet, setup
from PIL import Image, ImageDraw
from train_peers import RANK, FullFineTune, Reference, state_bytes

import sd_lora
from sd_lora.training import TrainConfig, loop, prepare
from sd_lora.training.buckets import assign_buckets
from sd_lora.training.caches import LiveLatents
from sd_lora.training.data import scan_images

# The public SD1.5 (stable-diffusion-v1-5) VAE config.
SD15_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
            "block_out_channels": (128, 256, 512, 512), "act_fn": "silu", "sample_size": 512,
            "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
            "scaling_factor": 0.18215}


def build(model: str):
    """(pipeline, resolution in px): tiny at 64 px, or the SD1.5 architecture at 256 px (32x32 latent)."""
    if model == "tiny":
        return sd_lora.load_pipeline("tiny"), 64
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    tiny = sd_lora.load_pipeline("tiny")  # tokenizer (ids < 976 are valid CLIP-L ids) and scheduler config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(**SD15_VAE).eval().requires_grad_(False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=clip_l(), tokenizer=tiny.tokenizer, unet=sd15_unet(),
                                   scheduler=tiny.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, 256


def make_images(folder: Path, size: int, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = Image.new("RGB", (size, size), (235, 225, 200))
        ImageDraw.Draw(image).ellipse((size // 5 + i, size // 4, size // 2 + i, size * 3 // 4), fill=(40 * i, 70, 200))
        image.save(folder / f"img_{i}.png")
    return folder


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


class Ours:
    """Our Trainer on the pipeline, as train/style.py builds it; `step(cached)` is one optimizer step."""

    def __init__(self, pipe, folder: Path, resolution: int, out: Path, text_encoder: bool = True,
                 compile: bool = False):
        cfg = TrainConfig(images=str(folder), model="bench", output=str(out), rank=RANK, flip=False, steps=10**6,
                          text_encoder=text_encoder, sample_every=0, save_every=0, log_with="none",
                          compile=compile).resolved()
        records = assign_buckets(scan_images(folder, cfg.prompt, cfg.token, warn=None), resolution)
        self.trainer = loop.Trainer(cfg, pipe, records, [], prepare.make_accelerator(cfg, notice=False), resolution)
        self.cached, self.live = self.trainer.latents, LiveLatents(records, pipe.vae)

    def step(self, cached: bool = True) -> float:
        self.trainer.latents = self.cached if cached else self.live
        return self.trainer.step()

    def memory(self) -> int:
        """Bytes of gradients (one per trainable weight) plus AdamW state."""
        grads = sum(p.numel() * p.element_size() for p in self.trainer.params)
        return grads + state_bytes(self.trainer.optimizer.optimizer)

    def close(self) -> None:
        self.trainer.lora.detach()
        reset_accelerate()


def timed(fn, times: list) -> None:
    gc.collect()
    start = time.perf_counter()
    loss = fn()
    times.append(time.perf_counter() - start)
    assert np.isfinite(loss), f"non-finite loss {loss}"


def interleaved(variants: dict, steps: int, warmup: int = 3) -> dict[str, list[float]]:
    """`warmup` untimed rounds, then `steps` rounds in which every variant takes one step, the order rotating. The
    first steps of a process are several times slower (allocator, page faults, kernel set-up), hence the warm-up."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times = {name: [] for name in names}
    for i in range(steps):
        for name in names[i % len(names):] + names[:i % len(names)]:
            timed(variants[name], times[name])
    return times


def compiled(pipe, twin, folder: Path, resolution: int, steps: int, work: Path) -> dict[str, list[float]]:
    """Ours with --compile (caching on) against the reference, after a first step that compiles (timed on its own)."""
    import torch._dynamo

    ref = Reference(pipe, twin, folder, resolution, f"an image in the style of {folder.name}")
    ours = Ours(pipe, folder, resolution, work / "out_compiled", compile=True)
    first: list[float] = []
    timed(ours.step, first)
    t = interleaved({"compiled": ours.step, "reference": ref.step}, steps)
    ours.close()
    ref.close()
    torch._dynamo.reset()
    return {"compile_first_step": first, "compiled": t["compiled"], "reference_vs_compiled": t["reference"]}


def bench(model: str, steps: int, work: Path, compile: bool = False) -> dict:
    pipe, resolution = build(model)
    twin = copy.deepcopy(pipe.unet)  # the peers' UNet: same weights, so ours and theirs can alternate step by step
    folder = make_images(work / f"{model}_images", resolution, n=2)
    in_backward = model != "tiny"

    ref = Reference(pipe, twin, folder, resolution, f"an image in the style of {folder.name}")
    ours = Ours(pipe, folder, resolution, work / "out")
    t = interleaved({"cached": lambda: ours.step(True), "live": lambda: ours.step(False), "reference": ref.step},
                    steps)
    mem = {"ours": ours.memory()}
    ours.close()
    ref.close()

    ref_unet = Reference(pipe, twin, folder, resolution, f"an image in the style of {folder.name}",
                         train_text_encoder=False)
    lora_unet = Ours(pipe, folder, resolution, work / "out_unet", text_encoder=False)
    t |= interleaved({"lora_unet": lora_unet.step, "reference_unet": ref_unet.step}, steps)
    ref_unet.close()
    latents = lora_unet.cached.params([(0, False)])
    text = lora_unet.trainer.texts([lora_unet.trainer.records[0].caption])
    full = FullFineTune(pipe, twin, latents, text, in_backward)
    times = interleaved({"lora_unet": lora_unet.step, "full": full.step}, steps)
    t["lora_unet_vs_full"], t["full"] = times["lora_unet"], times["full"]
    mem |= {"lora_unet": lora_unet.memory(), "full": full.memory()}
    lora_unet.close()
    full.close()
    if compile:
        t |= compiled(pipe, twin, folder, resolution, steps, work)

    res = {k: median(v) for k, v in t.items()}
    res |= {"ratio_cached": median(r / c for r, c in zip(t["reference"], t["cached"])),
            "ratio_live": median(r / c for r, c in zip(t["reference"], t["live"])),
            "ratio_unet": median(r / c for r, c in zip(t["reference_unet"], t["lora_unet"])),
            "ratio_full": median(f / o for f, o in zip(t["full"], t["lora_unet_vs_full"])),
            "min_cached": min(t["reference"]) / min(t["cached"]), "min_live": min(t["reference"]) / min(t["live"]),
            "min_unet": min(t["reference_unet"]) / min(t["lora_unet"]),
            "min_full": min(t["full"]) / min(t["lora_unet_vs_full"])}
    if compile:
        res |= {"ratio_compiled": median(r / c for r, c in zip(t["reference_vs_compiled"], t["compiled"])),
                "min_compiled": min(t["reference_vs_compiled"]) / min(t["compiled"])}
    for name, times in t.items():
        print(f"  {name:18s} " + " ".join(f"{x:.3f}" for x in times), flush=True)
    return res | {"mem": mem, "in_backward": in_backward, "resolution": resolution, "steps": steps}


def report(model: str, res: dict) -> list[str]:
    mem, mem_ratio = res["mem"], res["mem"]["lora_unet"] / res["mem"]["full"]
    full_kind = "AdamW in backward, scratch moments" if res["in_backward"] else "torch fused AdamW"

    def row(label: str, key: str) -> str:
        return f"  {label:44s} {res[key]:8.3f} s/step  {1 / res[key]:7.2f} images/s"

    def ratio(label: str, key: str, goal: float | None) -> str:
        verdict = f"  goal >= {goal}x  {_ok(res['ratio_' + key] >= goal)}" if goal else "  (report only)"
        return f"  {label:44s} {res['ratio_' + key]:.2f}x (fastest steps {res['min_' + key]:.2f}x){verdict}"

    side = res["resolution"] // 8
    return [
        f"{model} ({res['resolution']} px, {side}x{side} latent), {res['steps']} timed steps per variant:",
        "  default run (UNet cross-attn + text encoder LoRA, text encoder trained):",
        row("ours, caching on", "cached"), row("ours, caching off", "live"),
        row("reference (dreambooth, --train_text_encoder)", "reference"),
        ratio("caching on / reference", "cached", 1.5), ratio("caching off / reference", "live", 1.0),
        "  UNet-only run (--no-text-encoder: latents and text embeddings cached):",
        row("ours", "lora_unet"), row("reference (dreambooth, frozen text encoder)", "reference_unet"),
        ratio("ours / reference", "unet", None),
        "  LoRA against full fine-tuning of the UNet, equal cached inputs:",
        row("ours, UNet-only LoRA", "lora_unet_vs_full"), row(f"full fine-tuning ({full_kind})", "full"),
        ratio("LoRA step speed-up", "full", 1.25),
        (f"  gradient + optimizer memory: LoRA {mem['lora_unet'] / 2**20:.2f} MB, full {mem['full'] / 2**20:.1f} MB, "
         f"ratio {mem_ratio:.5f}  goal <= 0.333  {_ok(mem_ratio <= 1 / 3)}"),
        f"  (default run, text encoder trained: gradient + optimizer memory {mem['ours'] / 2**20:.2f} MB)",
    ] + (compiled_report(res, row, ratio) if "compiled" in res else [])


def compiled_report(res: dict, row, ratio) -> list[str]:
    saved = res["cached"] - res["compiled"]  # per step, against ours without --compile
    payoff = (f"pays for itself after {(res['compile_first_step'] - res['compiled']) / saved:.0f} steps"
              if saved > 0 else "never pays for itself: no faster than without --compile")
    return ["  --compile (caching on), against the reference in the same turns:",
            row("ours, --compile", "compiled"), row("reference", "reference_vs_compiled"),
            ratio("--compile / reference", "compiled", 1.5),
            (f"  --compile / the reference in the default run's turns: {res['reference'] / res['compiled']:.2f}x "
             f"(the reference took {res['reference']:.3f} s/step there, {res['reference_vs_compiled']:.3f} here)"),
            f"  first step (compiles UNet and text encoder): {res['compile_first_step']:.1f} s; {payoff}"]


def _ok(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def as_run(model: str, default: dict, trainer: dict) -> list[str]:
    """Ours as train() runs it (glibc keeping freed memory) against the reference as diffusers' script runs (glibc's
    default), each from its own process: ratios of the two processes' medians."""
    def ratio(label: str, ref: str, ours: str, goal: float | None) -> str:
        r = default[ref] / trainer[ours]
        verdict = f"  goal >= {goal}x  {_ok(r >= goal)}" if goal else "  (report only)"
        return f"  {label:58s} {default[ref]:.3f} / {trainer[ours]:.3f} s = {r:.2f}x{verdict}"

    return [f"{model}, as each program runs (reference: default allocator; ours: train()'s allocator setting):",
            ratio("caching on / reference (default run)", "reference", "cached", 1.5),
            ratio("caching off / reference (default run)", "reference", "live", 1.0),
            ratio("UNet-only / reference with a frozen text encoder", "reference_unet", "lora_unet", None),
            (f"  peak RSS: default-allocator process {default['peak_rss_mb']:.0f} MB, trainer-allocator process "
             f"{trainer['peak_rss_mb']:.0f} MB")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "sd15"], choices=["tiny", "sd15"])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: 30 for tiny, "
                                                                 "6 for sd15)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true",
                        help="also time ours with --compile (inductor) against the reference; the first step compiles")
    parser.add_argument("--allocator", choices=["both", "default", "trainer"], default="both",
                        help="default: glibc as it comes; trainer: glibc keeping freed memory, as train() sets it on "
                             "the CPU; both (default): each in its own process, then the as-run comparison")
    parser.add_argument("--json", help=argparse.SUPPRESS)  # where a single-allocator run leaves its numbers
    args = parser.parse_args()
    if args.allocator == "both":
        return run_both(args)
    if args.allocator == "trainer":
        from sd_lora.training import host_memory

        assert host_memory.keep_freed_memory(), "glibc's mallopt is not available here"
    setup(args.threads)
    print(f"# train_step benchmark, {datetime.datetime.now():%Y-%m-%d %H:%M}, {machine()}, "
          f"allocator: {args.allocator}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="sd_lora_bench_train_") as tmp:
        for model in args.models:
            steps = args.steps or (30 if model == "tiny" else 6)
            print(f"\n== {model}: {steps} timed steps per variant, interleaved", flush=True)
            start = time.perf_counter()
            results[model] = bench(model, steps, Path(tmp), args.compile)
            print("\n".join(report(model, results[model])))
            print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
            gc.collect()
    for res in results.values():
        res["peak_rss_mb"] = peak_rss_mb()
    if args.json:
        Path(args.json).write_text(json.dumps(results))


def run_both(args) -> None:
    """Both allocator settings, each in a fresh process (a process cannot go back to glibc's dynamic threshold)."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="sd_lora_bench_train_") as tmp:
        for allocator in ("default", "trainer"):
            out = Path(tmp) / f"{allocator}.json"
            cmd = [sys.executable, __file__, "--allocator", allocator, "--json", str(out), "--threads",
                   str(args.threads), "--models", *args.models] + (["--steps", str(args.steps)] if args.steps else [])
            cmd += ["--compile"] if args.compile else []
            print(f"\n######## allocator: {allocator}", flush=True)
            subprocess.run(cmd, check=True)
            results[allocator] = json.loads(out.read_text())
    print("\n######## as run")
    for model in args.models:
        print("\n".join(as_run(model, results["default"][model], results["trainer"][model])))


if __name__ == "__main__":
    main()
