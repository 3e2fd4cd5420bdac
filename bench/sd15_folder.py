"""Write an SD1.5-architecture pipeline (random weights, fp16) as a diffusers folder, so that train/style.py can
train the real architecture end to end without the hub: `--model <folder>`. The weights are random, so its samples
are noise; what such a run shows is the trainer at full size: steps/s, peak memory, files.

    python bench/sd15_folder.py /tmp/sd15
    accelerate launch train/style.py --model /tmp/sd15 --images datasets/mozart_art --rank 4 --steps 200
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from train_step import build


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    pipe, _ = build("sd15")
    pipe.to(torch.float16).save_pretrained(Path(sys.argv[1]), safe_serialization=True)
    print(f"wrote {sys.argv[1]}: UNet {sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.0f}M parameters")


if __name__ == "__main__":
    main()
