"""Blend two LoRA adapters on the built-in tiny model and write a comparison strip.

    python examples/two_adapters.py [--out demo_out/two_adapters.png]

The two adapters are made here (random low-rank updates saved as real kohya .safetensors files) so the example runs
offline; with your own files, only the `lora.load(...)` lines change.
"""

import argparse
from pathlib import Path

import torch
from PIL import Image

import sd_lora
from sd_lora.targets import preset_paths


def make_adapter(pipe, path: Path, seed: int, rank: int = 4) -> None:
    """A stand-in for a downloaded style LoRA: random up and down on kohya's default targets."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for part in ("unet", "text_encoder"):
        model = getattr(pipe, part)
        for p in preset_paths(model, part, "full"):
            base = model.get_submodule(p)
            k = base.kernel_size if isinstance(base, torch.nn.Conv2d) else ()
            n_in = base.in_channels if k else base.in_features
            n_out = base.out_channels if k else base.out_features
            down = torch.randn(rank, n_in, *k, generator=g) * 0.2
            up = torch.randn(n_out, rank, *([1, 1] if k else []), generator=g) * 0.2
            modules[f"{part}.{p}"] = sd_lora.LoRAModule(down, up, alpha=float(rank))
    sd_lora.save_adapter(sd_lora.AdapterWeights(modules, family="sd1"), path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo_out/two_adapters.png")
    args = ap.parse_args()
    out = Path(args.out)
    pipe = sd_lora.load_pipeline("tiny")
    for seed, name in enumerate(("mozart", "ink")):
        make_adapter(pipe, out.parent / f"{name}.safetensors", seed)

    lora = sd_lora.attach(pipe)
    lora.load(out.parent / "mozart.safetensors", name="mozart")
    lora.load(out.parent / "ink.safetensors", name="ink")
    images = []
    for weights in ({}, {"mozart": 1.0}, {"ink": 1.0}, {"mozart": 0.6, "ink": 0.4}):
        lora.set_weights(weights)
        image = pipe("a red circle on a blue background", num_inference_steps=20, height=64, width=64, guidance_scale=2.0,
                     generator=torch.Generator().manual_seed(0)).images[0]
        images.append(image)
        print(f"generated with {weights or 'the base model'}")
    strip = Image.new("RGB", (64 * len(images), 64))
    for i, im in enumerate(images):
        strip.paste(im, (64 * i, 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    strip.resize((strip.width * 4, strip.height * 4), Image.NEAREST).save(out)
    print(f"wrote {out}: base | mozart | ink | 0.6 mozart + 0.4 ink")


if __name__ == "__main__":
    main()
