"""GPU training-step benchmark (issue 3): the SD1.5 architecture at 512 px in fp16, batch 1 and 4 — images/s and peak
VRAM of our trainer's step (sd_lora.training.loop.Trainer.step, as train/style.py runs it: latents cached, text
encoder trained) against the diffusers-style reference step (train_peers.Reference: VAE and text encoder every step,
PEFT LoRA on the same modules and rank, accelerate-style fp16 with loss scaling). No gradient checkpointing.

Each (variant, batch) runs in a fresh process, so peak VRAM is that variant's alone (weights included). Goals: at most
6 GB at batch 1, and at least the reference's images/s.

    python bench/train_gpu.py                                                # cuda, SD1.5 at 512 px, fp16, batch 1, 4
    python bench/train_gpu.py --device cpu --model tiny --precision no --steps 3   # smoke run without a GPU
    python bench/train_gpu.py --variants ours ours-xformers ours-compile reference   # more of ours (compile:
                                                                  # the first step compiles, not timed)
    python bench/train_gpu.py --batches 1 --profile 10   # and where each step's time goes (torch.profiler)

On a GPU machine that has torch, transformers, accelerate and peft but not diffusers (this project's lent device
machines), `bench/on_gpu.sh bench` runs it after installing the wheels in .whl/ (.gitignore'd), fetched here with:
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl diffusers==0.42.1 importlib_metadata lazy-importer [xformers bitsandbytes]
bench/RESULTS.md has the numbers and when they were taken.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import median, setup
from train_peers import RANK, Reference
from train_step import build, make_images, reset_accelerate

from sd_lora.training import TrainConfig, loop, prepare
from sd_lora.training.buckets import assign_buckets
from sd_lora.training.data import scan_images

VARIANTS = ["ours", "reference", "ours-xformers", "ours-compile"]  # in the order they run at each batch size


def ours(pipe, folder: Path, resolution: int, batch: int, precision: str, out: Path, variant: str = "ours"):
    """Our Trainer as train() sets it up: pipeline on the device, frozen weights in the low precision.
    `variant`: ours, ours-xformers (--attention xformers) or ours-compile (--compile)."""
    cfg = TrainConfig(images=str(folder), model="bench", output=str(out), rank=RANK, flip=False, steps=10**6,
                      batch_size=batch, mixed_precision=precision, sample_every=0, save_every=0,
                      log_with="none", compile=variant == "ours-compile",
                      attention="xformers" if variant == "ours-xformers" else "sdpa").resolved()
    prepare.check_extras(cfg)
    accelerator = prepare.make_accelerator(cfg, notice=False)
    pipe.to(accelerator.device)
    pipe.to(dtype=prepare.weight_dtype(accelerator))
    records = assign_buckets(scan_images(folder, cfg.prompt, cfg.token, warn=None), resolution)
    return loop.Trainer(cfg, pipe, records, [], accelerator, resolution).step


def reference(pipe, folder: Path, resolution: int, batch: int, precision: str):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    pipe.to(pipe.unet.device, dtype)
    return Reference(pipe, pipe.unet, folder, resolution, f"an image in the style of {folder.name}", batch=batch,
                     precision=precision, copy_text_encoder=False).step


def measure(args) -> dict:
    """One variant at one batch size, in this process: seconds per step (median) and peak device memory."""
    setup(args.threads)
    cuda = args.device == "cuda"
    pipe, native = build(args.model)
    resolution = args.resolution or (512 if args.model == "sd15" else native)
    pipe.to(args.device)
    with tempfile.TemporaryDirectory(prefix="sd_lora_bench_gpu_") as tmp:
        folder = make_images(Path(tmp) / "images", resolution, n=max(4, args.batch))
        if args.variant.startswith("ours"):
            step = ours(pipe, folder, resolution, args.batch, args.precision, Path(tmp) / "out", args.variant)
        else:
            step = reference(pipe, folder, resolution, args.batch, args.precision)
        start = time.perf_counter()
        step()  # with --compile, this one compiles
        first = time.perf_counter() - start
        for _ in range(args.warmup - 1):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step()  # returns loss.item(): the step has finished on the device
            times.append(time.perf_counter() - start)
        profiled = profile(step, args.profile, cuda) if args.profile else None
        reset_accelerate()
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    reserved = torch.cuda.max_memory_reserved() if cuda else 0
    return {"seconds": median(times), "images_per_s": args.batch / median(times), "peak_gb": peak / 1e9,
            "reserved_gb": reserved / 1e9, "times": times, "first": first, "profile": profiled}


def profile(step, steps: int, cuda: bool) -> str:
    """Where a step's time goes, over `steps` more steps under torch.profiler: wall time, the time the device was
    busy with kernels (so how much of the step the GPU waits on the CPU-side work), and the operators with the
    most CPU-side time of their own."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    with profiler(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - start) / steps
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events) / steps / 1e6
    head = (f"profiled {steps} steps: {wall * 1e3:.1f} ms/step wall (with the profiler's own overhead), device busy "
            f"{busy * 1e3:.1f} ms/step ({busy / wall:.0%})")
    return head + "\n" + events.table(sort_by="self_cpu_time_total", row_limit=25)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="sd15", choices=["sd15", "tiny"])
    p.add_argument("--resolution", type=int, default=None, help="default: 512 for sd15, the tiny model's own size")
    p.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "no"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile N more steps of each run (torch.profiler) and print where time goes")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=["ours", "reference"],
                   help="what to run at each batch size (ours and reference are always among them)")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one run, in this process
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"# train_gpu benchmark, {datetime.datetime.now():%Y-%m-%d %H:%M}, {device}, torch {torch.__version__}, "
          f"{args.model} at {args.resolution or 'native'} px, {args.precision}, {args.steps} timed steps after "
          f"{args.warmup} warm-up", flush=True)
    rows = {}
    for batch in args.batches:
        for variant in [v for v in VARIANTS if v in {"ours", "reference", *args.variants}]:
            cmd = [sys.executable, __file__, "--variant", variant, "--batch", str(batch)] + [
                f"--{k}={v}" for k, v in (("device", args.device), ("model", args.model),
                                          ("precision", args.precision), ("steps", args.steps),
                                          ("warmup", args.warmup), ("threads", args.threads),
                                          ("profile", args.profile))]
            if args.resolution:
                cmd.append(f"--resolution={args.resolution}")
            done = subprocess.run(cmd, check=False, capture_output=True, text=True)
            result = next((json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")),
                          None)
            if result is None:
                error = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), "no output")
                print(f"  batch {batch} {variant:12s} FAILED: {error[:300]}", flush=True)
                if variant in ("ours", "reference"):
                    sys.exit(done.stderr[-3000:])
                continue
            rows[variant, batch] = result
            print(f"  batch {batch} {variant:12s} {result['seconds']:.4f} s/step  {result['images_per_s']:7.2f} "
                  f"images/s  peak {result['peak_gb']:.2f} GB allocated, {result['reserved_gb']:.2f} GB reserved; "
                  f"first step {result['first']:.1f} s", flush=True)
            if result["profile"]:
                print(f"  batch {batch} {variant}: {result['profile']}", flush=True)
        ratio = rows["ours", batch]["images_per_s"] / rows["reference", batch]["images_per_s"]
        print(f"  batch {batch}: ours / reference images/s = {ratio:.2f}x (goal >= 1.0x: "
              f"{'MET' if ratio >= 1 else 'MISSED'})")
        for variant in [v for v in VARIANTS[2:] if (v, batch) in rows]:
            ratio = rows[variant, batch]["images_per_s"] / rows["reference", batch]["images_per_s"]
            print(f"  batch {batch}: {variant} / reference images/s = {ratio:.2f}x")
    if 1 in args.batches and args.device == "cuda":
        peak = rows["ours", 1]["peak_gb"]
        print(f"  ours at batch 1: peak {peak:.2f} GB (goal <= 6 GB: {'MET' if peak <= 6 else 'MISSED'})")


if __name__ == "__main__":
    main()
