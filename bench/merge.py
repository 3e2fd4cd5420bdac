"""Merge benchmark: fold a 4-adapter blend into an SD1.5-architecture checkpoint and write it; ours against diffusers.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/merge.py      # ~5-10 min on 2 shared CPU cores, ~30 GB of disk

Setup (not timed): the SD1.5 UNet (public config, random weights, fixed seed, ~860M parameters), CLIP-L and the SD1.5
VAE, fp32, saved once as a diffusers folder and once as an original-SD single file; four rank-16 kohya adapters (fp16
files, as shared) on kohya's full target set, 192 UNet + 72 CLIP modules each. Each adapter has one alpha for all its
modules: diffusers mis-scales per-module alphas, and this comparison is about time and memory, not that bug.

Routes, each in a fresh subprocess so its peak memory (VmHWM) is its own, timed from files on disk to the merged
checkpoint on disk, imports excluded (blend weights 0.8, 0.5, -0.3, 0.6):
  copy         from_pretrained + save_pretrained, no LoRA: the I/O floor of the in-memory folder routes
  diffusers    from_pretrained, load_lora_weights x4, set_adapters, fuse_lora, unload_lora_weights, save_pretrained
  ours-loaded  the same shape as diffusers: load_pipeline, read the 4 files, merge_into_pipeline, write_folder (what
               `sd-lora merge` does for a hub id or "tiny")
  ours-folder  `sd-lora merge` folder -> folder: UNet and CLIP weight files streamed with the blend added, the rest
               copied; the model is never loaded
  ours-single  `sd-lora merge` single file -> single file: the file's own key space, streamed
Correctness: sampled merged weights (UNet and text encoder) of each of our routes agree with diffusers' to 1e-5, and
differ from the base. A failed check exits with status 1 after printing the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from common import clip_l, machine, random_adapter, sd15_pipeline, sd15_unet, setup

WEIGHTS = (0.8, 0.5, -0.3, 0.6)
SD15_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (128, 256, 512, 512),
            "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 512,
            "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}


def prepare(work: Path) -> dict:
    import torch
    from diffusers import AutoencoderKL

    import sd_lora
    from sd_lora.checkpoint import write_single_file

    t = time.perf_counter()
    unet, te = sd15_unet(), clip_l()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(**SD15_VAE).eval().requires_grad_(False)
    pipe = sd15_pipeline(unet, te)
    pipe.register_modules(vae=vae)
    pipe.save_pretrained(work / "model", safe_serialization=True)
    write_single_file(pipe, work / "model.safetensors", None, {})
    for i, weight in enumerate(WEIGHTS):
        w = random_adapter({"unet": unet, "text_encoder": te}, preset="full", rank=16, alpha=8.0 + i, seed=i)
        sd_lora.save_adapter(w, work / f"lora{i}.safetensors")  # fp16, kohya: what people share
    params = sum(p.numel() for m in (unet, te, vae) for p in m.parameters())
    return {"seconds": time.perf_counter() - t, "params": params, "modules": len(w.modules)}


class Phases(dict):
    """Seconds per named phase of one route: `with phases.timed("load"): ...`."""

    @contextmanager
    def timed(self, name: str):
        t = time.perf_counter()
        yield
        self[name] = time.perf_counter() - t


def _peer_load(work: Path, phases: Phases):
    from diffusers import StableDiffusionPipeline

    with phases.timed("load"):
        return StableDiffusionPipeline.from_pretrained(work / "model", safety_checker=None)


def _items(work: Path) -> list:
    import sd_lora

    return [(sd_lora.read_adapter(work / f"lora{i}.safetensors"), w) for i, w in enumerate(WEIGHTS)]


def route_copy(work: Path, out: Path) -> dict:
    phases = Phases()
    pipe = _peer_load(work, phases)
    with phases.timed("save"):
        pipe.save_pretrained(out, safe_serialization=True)
    return phases


def route_diffusers(work: Path, out: Path) -> dict:
    phases = Phases()
    pipe = _peer_load(work, phases)
    with phases.timed("lora"):
        names = [f"lora{i}" for i in range(len(WEIGHTS))]
        for name in names:
            pipe.load_lora_weights(str(work), weight_name=f"{name}.safetensors", adapter_name=name)
        pipe.set_adapters(names, adapter_weights=list(WEIGHTS))
        pipe.fuse_lora(components=["unet", "text_encoder"])
        pipe.unload_lora_weights()  # diffusers' documented way to keep the fused weights and drop the LoRA layers
    with phases.timed("save"):
        pipe.save_pretrained(out, safe_serialization=True)
    return phases


def route_ours_loaded(work: Path, out: Path) -> dict:
    import sd_lora
    from sd_lora import merge
    from sd_lora.checkpoint import write_folder

    phases = Phases()
    with phases.timed("load"):
        pipe = sd_lora.load_pipeline(work / "model")
    with phases.timed("lora"):
        merge.merge_into_pipeline(pipe, _items(work))
    with phases.timed("save"):
        write_folder(pipe, out)
    return phases


def route_ours_folder(work: Path, out: Path) -> dict:
    from sd_lora import merge

    phases = Phases()
    with phases.timed("all"):
        merge.merge_checkpoint(work / "model", _items(work), out)
    return phases


def route_ours_single(work: Path, out: Path) -> dict:
    from sd_lora import merge

    phases = Phases()
    with phases.timed("all"):
        merge.merge_checkpoint(work / "model.safetensors", _items(work), out)
    return phases


ROUTES = {"copy": (route_copy, "copy"), "diffusers": (route_diffusers, "diffusers"),
          "ours-loaded": (route_ours_loaded, "ours-loaded"), "ours-folder": (route_ours_folder, "ours-folder"),
          "ours-single": (route_ours_single, "ours.safetensors")}


def child(route: str, work: Path, threads: int) -> None:
    """Run one route in this (fresh) process and print its result as one JSON line."""
    setup(threads)
    from diffusers import StableDiffusionPipeline  # noqa: F401  imports are not part of any route's time

    from sd_lora import merge  # noqa: F401

    fsync = _time_fsync()
    if route == "prepare":
        result = prepare(work)
    else:
        fn, out = ROUTES[route]
        t = time.perf_counter()
        result = {"phases": fn(work, work / out), "seconds": time.perf_counter() - t}
        if fsync[0]:
            result["phases"]["of which fsync"] = fsync[0]
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result), flush=True)


def _time_fsync() -> list[float]:
    """Count the time spent in os.fsync: our atomic writes flush to disk before the rename, save_pretrained does not,
    so the folder routes leave gigabytes of dirty page cache behind that the single-file route has already paid for."""
    spent, real = [0.0], os.fsync

    def fsync(fd):
        t = time.perf_counter()
        real(fd)
        spent[0] += time.perf_counter() - t
    os.fsync = fsync
    return spent


def peak_rss_mb() -> float:
    """This process's own peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forked parent
    across exec, so a child would report at least its parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def spawn(route: str, work: Path, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", route, "--work", str(work), "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"route {route} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# ---- correctness ------------------------------------------------------------------------------------------------
def _folder_tensor(folder: Path, part: str, key: str):
    from safetensors import safe_open

    for f in sorted((folder / part).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            names = h.keys()
            hit = [k for k in names if k in (key, "text_model." + key)]
            if hit:
                return h.get_tensor(hit[0])
    raise KeyError(f"{key} not in {folder / part}")


def check(work: Path, routes: list[str]) -> list[str]:
    """Sampled merged weights: each of our routes against diffusers, and diffusers against the base."""
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    from sd_lora.formats import ldm

    config = UNet2DConditionModel.load_config(work / "model" / "unet")
    paths = [("unet", f"down_blocks.{b}.attentions.0.transformer_blocks.0.{m}") for b in range(3)
             for m in ("attn1.to_q", "attn2.to_k", "ff.net.0.proj")] + \
            [("unet", "mid_block.attentions.0.proj_in"), ("unet", "up_blocks.3.attentions.2.proj_out")] + \
            [("text_encoder", f"encoder.layers.{i}.{m}") for i in (0, 11) for m in ("self_attn.q_proj", "mlp.fc2")]
    ours = [r for r in routes if r.startswith("ours")]
    worst, failed = dict.fromkeys(ours, 0.0), []
    for part, path in paths:
        key = path + ".weight"
        peer = _folder_tensor(work / "diffusers", part, key)
        scale = float(peer.abs().max())
        moved = float((peer - _folder_tensor(work / "model", part, key)).abs().max()) / scale
        for route in ours:
            if route == "ours-single":
                ldm_key = (ldm.UNET_PREFIX + ldm.unet_path_to_ldm(path, config) if part == "unet"
                           else ldm.TEXT_ENCODER_PREFIX + "text_model." + path) + ".weight"
                with safe_open(str(work / "ours.safetensors"), "pt") as f:
                    got = f.get_tensor(ldm_key).reshape(peer.shape)
            else:
                got = _folder_tensor(work / ROUTES[route][1], part, key)
            worst[route] = max(worst[route], float((got - peer).abs().max()) / scale)
        if moved < 1e-3:
            failed.append(f"{part}.{path} (the blend did not move it)")
    for route, d in worst.items():
        print(f"  check {route}: max |ours - diffusers| / max |diffusers| over {len(paths)} merged weights = {d:.1e}"
              f" -> {'ok' if d <= 1e-5 else 'FAILED'}")
        if d > 1e-5:
            failed.append(route)
    return failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/sd_lora_bench_merge"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--routes", nargs="+", choices=ROUTES, default=list(ROUTES))
    ap.add_argument("--keep", action="store_true", help="keep the ~30 GB of checkpoints afterwards")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.work, args.threads)
        return 0
    print(machine())
    args.work.mkdir(parents=True, exist_ok=True)
    prep = spawn("prepare", args.work, args.threads)
    print(f"setup: {prep['params'] / 1e6:.0f}M parameters (UNet + CLIP-L + VAE, fp32), 4 rank-16 kohya adapters of "
          f"{prep['modules']} modules each, in {prep['seconds']:.0f} s")
    results = {}
    for route in args.routes:
        results[route] = spawn(route, args.work, args.threads)
        r = results[route]
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in r["phases"].items())
        print(f"  {route:<12} {r['seconds']:7.1f} s   peak RSS {r['peak_rss_mb'] / 1024:5.2f} GB   ({phases})")
    failed = check(args.work, list(results)) if "diffusers" in results else []
    if "diffusers" in results:
        peer = results["diffusers"]
        for route in ("ours-loaded", "ours-folder", "ours-single"):
            if route in results:
                r = results[route]
                print(f"  {route} / diffusers: time {r['seconds'] / peer['seconds']:.2f}x, "
                      f"peak memory {r['peak_rss_mb'] / peer['peak_rss_mb']:.2f}x")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    if failed:
        print(f"CORRECTNESS CHECKS FAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
