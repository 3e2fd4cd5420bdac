"""Style benchmark: does the demo's style LoRA learn mozart_art on the tiny model, and does its weight slider work?

    HF_HUB_OFFLINE=1 .venv/bin/python bench/style.py            # trains with the README's command, then measures
    HF_HUB_OFFLINE=1 .venv/bin/python bench/style.py --adapter demo_out/mozart_art/mozart_art.safetensors

1. Trains the adapter exactly as `make demo` does, timed (goal: at most 5 minutes on CPU):
       accelerate launch train/style.py --images datasets/mozart_art --rank 4 --model tiny
   (`--adapter FILE` skips this and measures that file instead.)
2. Generates `-n` prompts (default 48) that the style set never showed: held-out color/shape/background
   combinations with the trigger word, image i from seed i, 20 steps, guidance 2, at adapter weights 0 (the base),
   0.5 and 1. Each picture gets sd_lora.training.metrics.style_score (0 = a plain scene, 1 = mozart_art) and the
   object-color check of the tiny model's quality benchmark.
3. Peer: the same adapter file loaded by diffusers (`pipe.load_lora_weights`) into a fresh tiny pipeline, weight 1,
   same prompts and seeds. Its style score should equal ours: the file people share works in diffusers too.

Goals (issue 6): base style score <= 0.2; at weight 1 >= 0.7; object color still right in >= 70%; weight 0.5 lands
strictly between the two. Exit status 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

import sd_lora
from sd_lora.training.metrics import style_score
from sd_lora.training.style_art import STYLE_GOALS, STYLE_GUIDANCE, evaluate_style, style_prompts

TRAIN_MINUTES_GOAL = 5.0
DEMO_COMMAND = ["train/style.py", "--images", "datasets/mozart_art", "--rank", "4", "--model", "tiny"]


def train(out: Path) -> tuple[Path, float]:
    """Run the README's main command (through accelerate launch, as a user would); returns (adapter, seconds)."""
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", *DEMO_COMMAND, "--output", str(out)]
    print("training: " + " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    run = subprocess.run(cmd, cwd=ROOT, check=False, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if run.returncode != 0:
        sys.exit(f"training failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    return out / "mozart_art.safetensors", seconds


def peer_style(adapter: Path, prompts, batch: int = 16) -> float:
    """Mean style score of the adapter at weight 1 when diffusers loads the file."""
    pipe = sd_lora.load_pipeline("tiny")
    pipe.load_lora_weights(str(adapter.parent), weight_name=adapter.name, adapter_name="style")
    scores = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        gens = [torch.Generator().manual_seed(start + i) for i in range(len(chunk))]
        images = pipe([p for p, _ in chunk], num_inference_steps=20, guidance_scale=STYLE_GUIDANCE, generator=gens,
                      height=64, width=64).images
        scores += [style_score(im, c) for im, (_, c) in zip(images, chunk)]
    return float(np.mean(scores))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", type=Path, default=None, help="measure this file instead of training one")
    ap.add_argument("-n", type=int, default=48, help="number of held-out prompts (max 56)")
    ap.add_argument("--token", default="mozart_art")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grid", type=Path, default=None, help="also save every picture as a labelled PNG grid")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        adapter, seconds = (args.adapter, None) if args.adapter else train(Path(tmp) / "mozart_art")
        prompts = style_prompts(args.n, args.token)
        pipe = sd_lora.load_pipeline("tiny")
        lora = sd_lora.attach(pipe)
        lora.load(adapter, name="style")
        result = evaluate_style(pipe, lora, "style", prompts)
        peer = peer_style(adapter, prompts)

    base, half, full = (result[w] for w in (0.0, 0.5, 1.0))
    goals = {
        "base style <= 0.2": base["style"] <= STYLE_GOALS["base_style_max"],
        "weight 1 style >= 0.7": full["style"] >= STYLE_GOALS["style_min"],
        "weight 1 color >= 70%": full["color"] >= STYLE_GOALS["color_min"],
        "weight 0.5 in between": base["style"] < half["style"] < full["style"],
    }
    if seconds is not None:
        goals["training <= 5 min"] = seconds <= 60 * TRAIN_MINUTES_GOAL
        print(f"training took {seconds:.0f} s ({seconds / 60:.1f} min)")
    print(f"style: {args.n} held-out prompts with '{args.token}', 20 steps, guidance {STYLE_GUIDANCE}, seeds 0..{args.n - 1}")
    for label, r in (("base (weight 0)", base), ("weight 0.5", half), ("weight 1", full)):
        print(f"  {label:<16} style score {r['style']:.3f}   object color matches {r['color']:.1%}")
    print(f"  peer: diffusers load_lora_weights, weight 1: style score {peer:.3f}; ratio ours/diffusers "
          f"{full['style'] / max(peer, 1e-9):.3f}")
    for label, ok in goals.items():
        print(f"  {label:<24} {'ok' if ok else 'MISSED'}")
    if args.grid:
        from sd_lora.grid import labelled_grid

        rows = [[result[w]["images"][i] for w in (0.0, 0.5, 1.0)] for i in range(len(prompts))]
        labelled_grid(rows, ["base", "0.5", "1.0"], [c for _, c in prompts]).save(args.grid)
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
