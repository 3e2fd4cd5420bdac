"""Generate datasets/mozart_art: 16 pictures in the mozart_art style (gold frame, cream paper, ink outlines)
with a caption .txt beside each, for the `make demo` style LoRA run.

Run from the repository root:  python train/make_mozart_art.py  [--out datasets/mozart_art] [--seed 0] [-n 16]
The output is committed; tests check it equals what this script writes: regenerate after changing the style.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

from sd_lora.training.style_art import DATASET_SEED, DATASET_SIZE, write_dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "datasets" / "mozart_art")
    parser.add_argument("--seed", type=int, default=DATASET_SEED)
    parser.add_argument("-n", type=int, default=DATASET_SIZE, help="number of images")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (the tiny model's is 64)")
    args = parser.parse_args(argv)
    for stale in list(args.out.glob("mozart_*.png")) + list(args.out.glob("mozart_*.txt")):
        stale.unlink()  # a smaller -n must not leave old pictures behind
    paths = write_dataset(args.out, n=args.n, seed=args.seed, size=args.size)
    print(f"wrote {len(paths)} images + captions to {args.out}")


if __name__ == "__main__":
    main()
