"""Before/after grid of a style adapter on the built-in tiny model: the base, then the adapter at 0.5 and 1.0.

    python examples/style_grid.py --adapter demo_out/mozart_art/mozart_art.safetensors --out demo_out/mozart_grid.png

`make demo` runs this after training the adapter with the README's main command. Each row is one prompt the style
set never showed (a held-out color/shape/background combination, with the trigger word); every column uses the same
seed, so the only difference is the adapter's weight. The style score of each column (sd_lora.training.metrics,
0 = plain, 1 = mozart_art) is printed and written into the picture's title.
"""

import argparse
from pathlib import Path

import sd_lora
from sd_lora.grid import labelled_grid
from sd_lora.report import trigger_words
from sd_lora.training.style_art import evaluate_style, style_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, required=True, help="the style adapter (.safetensors)")
    parser.add_argument("--out", type=Path, default=Path("demo_out/mozart_grid.png"))
    parser.add_argument("--token", default=None, help="trigger word (default: the adapter's own)")
    parser.add_argument("--prompts", type=int, default=4)
    args = parser.parse_args()

    pipe = sd_lora.load_pipeline("tiny")
    lora = sd_lora.attach(pipe)
    adapter = sd_lora.read_adapter(args.adapter)
    lora.load(adapter, name="style")
    token = args.token or (trigger_words(adapter.metadata) or [args.adapter.stem])[0]
    prompts = style_prompts(args.prompts, token)
    weights = (0.0, 0.5, 1.0)
    result = evaluate_style(pipe, lora, "style", prompts, weights)

    labels = ["base" if w == 0 else f"{token} {w:g}" for w in weights]
    rows = [[result[w]["images"][i] for w in weights] for i in range(len(prompts))]
    scores = "  ".join(f"{label}: {result[w]['style']:.2f}" for label, w in zip(labels, weights))
    image = labelled_grid(rows, labels, [caption for _, caption in prompts], title=f"style score  {scores}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    for label, w in zip(labels, weights):
        print(f"{label:>16}: style score {result[w]['style']:.2f}, object color matches {result[w]['color']:.0%}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
