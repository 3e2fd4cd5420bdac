"""The `sd-lora` command: thin argparse over sd_lora.merge, sd_lora.report and the runtime.

    sd-lora generate --model tiny --lora a.safetensors:0.8 --prompt "a violin" --out img.png
    sd-lora merge    --model M --lora A:0.7 --lora B:0.4 --out OUT [--dtype fp16|bf16|fp32]
    sd-lora blend    A:0.7 B:0.3 --out AB.safetensors [--rank R]
    sd-lora resize   FILE --rank R | --energy 0.9 --out OUT
    sd-lora extract  --base M --tuned M2 --rank R [--conv-rank R2] --out OUT
    sd-lora inspect  FILE [--plot spectrum.png] [--json]
    sd-lora convert  FILE --to kohya|diffusers --out OUT
    sd-lora ui

Every input is read and checked before anything is written, every write is atomic (temp file, then rename), and bad
input gets one line on stderr and exit code 2. The work itself lives in the library, where the UI reuses it.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import io
import json
import math
import os
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError

from sd_lora import lowrank, merge, report
from sd_lora.adapter import atomic_write_bytes, read_adapter, save_adapter
from sd_lora.pipeline import ModelLoadError, default_guidance
from sd_lora.weights import AdapterError, AdapterWeights

UI_APP = Path(__file__).resolve().parents[1] / "ui" / "app.py"  # built by the UI issue; optional here
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_KEEP_METADATA = ("ss_", "modelspec.", "sd_lora.blend")  # what an adapter's header carries over to its rewrite
_FRESH_METADATA = ("sshs_model_hash", "ss_output_name", "modelspec.date")  # ...except facts about the old file


class UsageError(Exception):
    """Bad flags or arguments: reported like any other bad input (one line, exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage and exits; we want one line and main()'s exit code
        raise UsageError(f"{self.prog}: {message}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(argv)
        if rest and args.command != "ui":  # only the UI passes unknown flags on (to the app)
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.args = rest
        _quiet()
        return args.run(args) or 0
    except SystemExit as e:  # --help, or a UI that exits
        return e.code if isinstance(e.code, int) else 0
    except (UsageError, AdapterError, ModelLoadError, SafetensorError, ValueError, KeyError, OSError,
            RuntimeError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"sd-lora: error: {' '.join(str(message).split())}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sd-lora", description="Stable Diffusion LoRA tools: generate, merge, blend, resize, "
                "extract, inspect, convert.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="generate an image with a blend of adapters")
    _model_flags(g)
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]", help="repeatable")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative", default=None, help="negative prompt")
    g.add_argument("--out", required=True, help="image file (.png, .jpg, .webp)")
    g.add_argument("--steps", type=_positive, default=20)
    g.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale (default: 2 for tiny, 7.5 otherwise)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--size", type=_size, default=None, metavar="WxH", help="default: the model's native size")
    g.set_defaults(run=cmd_generate)

    m = sub.add_parser("merge", help="fold a weighted blend into a checkpoint")
    _model_flags(m)
    m.add_argument("--lora", action="append", required=True, metavar="FILE[:WEIGHT]", help="repeatable")
    m.add_argument("--out", required=True, help="a folder (diffusers) or a .safetensors file (original SD layout)")
    m.add_argument("--dtype", choices=DTYPES, default=None, help="default: keep the model's dtype")
    m.set_defaults(run=cmd_merge)

    b = sub.add_parser("blend", help="write one adapter equal to a weighted sum of adapters")
    b.add_argument("adapters", nargs="+", metavar="FILE[:WEIGHT]")
    b.add_argument("--rank", type=_positive, default=None, help="SVD down to this rank (default: exact)")
    _adapter_out_flags(b)
    b.set_defaults(run=cmd_blend)

    r = sub.add_parser("resize", help="reduce an adapter's rank by SVD")
    r.add_argument("file")
    how = r.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=_positive, help="fixed rank")
    how.add_argument("--energy", type=_share, help="per module, the smallest rank keeping this share of Σσ²")
    _adapter_out_flags(r)
    r.set_defaults(run=cmd_resize)

    e = sub.add_parser("extract", help="a LoRA approximating the difference between two checkpoints")
    e.add_argument("--base", required=True, help="the original model")
    e.add_argument("--tuned", required=True, help="the fine-tuned model")
    e.add_argument("--rank", type=_positive, required=True)
    e.add_argument("--conv-rank", type=_positive, default=None, help="also extract resnet convs at this rank")
    e.add_argument("--config", default=None, help="local diffusers folder for single files without configs")
    _adapter_out_flags(e)
    e.set_defaults(run=cmd_extract)

    i = sub.add_parser("inspect", help="what is in a LoRA file, and is its rank too high?")
    i.add_argument("file")
    i.add_argument("--plot", default=None, metavar="PNG", help="save the singular-value spectra (needs matplotlib)")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    i.add_argument("--share", type=_share, default=report.SHARE, help="energy share for the effective rank")
    i.set_defaults(run=cmd_inspect)

    c = sub.add_parser("convert", help="rewrite an adapter in another format")
    c.add_argument("file")
    c.add_argument("--to", choices=("kohya", "diffusers"), required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--dtype", choices=DTYPES, default=None, help="default: keep the file's precision")
    c.set_defaults(run=cmd_convert)

    u = sub.add_parser("ui", add_help=False, help="start the Gradio app (ui/app.py); every flag, --help too, goes to it")
    u.set_defaults(run=cmd_ui)
    return p


def _model_flags(p):
    p.add_argument("--model", default="tiny", help='"tiny", a hub id, a diffusers folder or a .safetensors file')
    p.add_argument("--config", default=None, help="local diffusers folder for single files without configs")


def _adapter_out_flags(p):
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--format", choices=("kohya", "diffusers"), default="kohya")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: keep the inputs' precision")


# ---- argument types -------------------------------------------------------------------------------------------
def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _size(text: str) -> tuple[int, int]:
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or int(w) % 8 or int(h) % 8 or not int(w) or not int(h):
        raise argparse.ArgumentTypeError(f"expected WxH with multiples of 8, e.g. 512x512, got {text!r}")
    return int(w), int(h)


def parse_lora(spec: str) -> tuple[str, float]:
    """"a.safetensors:0.7" -> ("a.safetensors", 0.7); without a numeric suffix the weight is 1 ("C:\\x" stays a path).
    "a.safetensors:heavy" or a weight of nan/inf is a UsageError."""
    path, sep, weight = spec.rpartition(":")
    if not sep or not path:
        return spec, 1.0
    try:
        value = float(weight)
    except ValueError:
        if Path(path).is_file() and not Path(spec).exists():
            raise UsageError(f"--lora {spec}: the weight after ':' must be a number, got {weight!r}") from None
        return spec, 1.0
    if not math.isfinite(value):
        raise UsageError(f"--lora {spec}: the weight must be a finite number, got {weight!r}")
    return path, value


def read_items(specs: list[str]) -> list[tuple[AdapterWeights, float]]:
    """Read and validate every adapter up front, so nothing is written when one of them is bad."""
    return [(read_adapter(path), weight) for path, weight in map(parse_lora, specs)]


def _adapter_out(path: str) -> Path:
    out = Path(path)
    if out.suffix != ".safetensors":
        raise UsageError(f"{out}: adapters are written as .safetensors files")
    return out


def _out_dtype(choice: str | None, tensors) -> torch.dtype:
    """--dtype, else the inputs' precision: their one float dtype, fp32 when they mix."""
    if choice:
        return DTYPES[choice]
    kinds = {t.dtype for t in tensors if t.is_floating_point()}
    return kinds.pop() if len(kinds) == 1 else torch.float32


def _save(w: AdapterWeights, out: Path, fmt: str, dtype: torch.dtype) -> None:
    metadata = {k: v for k, v in w.metadata.items()
                if k.startswith(_KEEP_METADATA) and k not in _FRESH_METADATA}
    save_adapter(w, out, format=fmt, dtype=dtype, metadata=metadata)


def _describe(items) -> str:
    return ", ".join(f"{Path(w.source or 'adapter').name} ×{weight:g}" for w, weight in items)


def _tensors(items):
    return [t for w, _ in items for m in w.modules.values() for t in (m.down, m.up)]


# ---- commands -------------------------------------------------------------------------------------------------
def cmd_generate(a) -> int:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    import sd_lora

    out = Path(a.out)
    kind = Image.registered_extensions().get(out.suffix.lower())
    if kind not in ("PNG", "JPEG", "WEBP"):
        raise UsageError(f"{out}: write the image as .png, .jpg or .webp")
    items = read_items(a.lora)
    pipe = sd_lora.load_pipeline(a.model, config=a.config)
    lora = sd_lora.attach(pipe)
    weights = {}
    for w, weight in items:
        stem = Path(w.source).stem
        name = next(n for n in [stem] + [f"{stem}_{k}" for k in range(2, 100)] if n not in weights)
        lora.load(w, name=name)
        weights[name] = weight
    lora.set_weights(weights)
    width, height = a.size or (None, None)
    if a.cfg is None:
        a.cfg = default_guidance(a.model)
    image = pipe(a.prompt, negative_prompt=a.negative, num_inference_steps=a.steps, guidance_scale=a.cfg,
                 width=width, height=height, generator=torch.Generator().manual_seed(a.seed)).images[0]
    params = "\n".join([  # A1111's "parameters" text: the adapters as <lora:name:weight> tags after the prompt
        " ".join([a.prompt, *(f"<lora:{n}:{w:g}>" for n, w in weights.items())]),
        *([f"Negative prompt: {a.negative}"] if a.negative else []),
        (f"Steps: {a.steps}, CFG scale: {a.cfg:g}, Seed: {a.seed}, Size: {image.width}x{image.height}, "
         f"Model: {json.dumps(str(a.model)) if any(c in str(a.model) for c in ',:') else a.model}")])
    buf = io.BytesIO()
    if kind == "PNG":
        info = PngInfo()
        info.add_text("parameters", params)  # where A1111 and most viewers look for generation settings
        image.save(buf, format=kind, pnginfo=info)
    else:
        image.save(buf, format=kind)
    atomic_write_bytes(out, buf.getvalue())
    print(f"wrote {out} ({image.width}x{image.height})")
    return 0


def cmd_merge(a) -> int:
    items = read_items(a.lora)
    out = merge.merge_checkpoint(a.model, items, a.out, dtype=DTYPES[a.dtype] if a.dtype else None,
                                 config=a.config)
    print(f"merged {_describe(items)} into {a.model} -> {out}")
    return 0


def cmd_blend(a) -> int:
    out = _adapter_out(a.out)
    items = read_items(a.adapters)
    w = merge.blend_exact(items)
    fit = None
    if a.rank is not None:
        w, fit = lowrank.resize(w, rank=a.rank)
        for m in fit.modules:
            print(f"{m.name}: rank {m.rank_before} -> {m.rank_after}, energy kept {m.kept:.4f}")
    _save(w, out, a.format, _out_dtype(a.dtype, _tensors(items)))
    how = f"SVD to rank {a.rank}: {fit.summary()}" if fit else f"exact, rank {_ranks(w)}"
    print(f"blended {_describe(items)} -> {out} ({how})")
    return 0


def cmd_resize(a) -> int:
    out = _adapter_out(a.out)
    w = merge.diffusers_named(read_adapter(a.file))
    small, fit = lowrank.resize(w, rank=a.rank, energy=a.energy)
    for m in fit.modules:
        print(f"{m.name}: rank {m.rank_before} -> {m.rank_after}, relative error {m.error:.4g}")
    _save(small, out, a.format, _out_dtype(a.dtype, _tensors([(w, 1.0)])))
    print(f"resized {a.file} -> {out}: {fit.summary()}")
    return 0


def cmd_extract(a) -> int:
    from sd_lora.checkpoint import checkpoint_weights

    out = _adapter_out(a.out)
    base, family = checkpoint_weights(a.base, config=a.config)
    tuned, _ = checkpoint_weights(a.tuned, config=a.config)
    for path, weights in ((a.base, base), (a.tuned, tuned)):
        if not any(n.startswith("text_encoder.") for n in weights):  # e.g. SD2/SDXL single files (OpenCLIP layout)
            print(f"note: no CLIP-L text-encoder weights found in {path}: the LoRA covers the UNet only",
                  file=sys.stderr)
    w, fit = lowrank.extract(base, tuned, a.rank, a.conv_rank, family=family)
    sample = next(iter(base.values()))
    dtype = DTYPES[a.dtype] if a.dtype else (sample() if callable(sample) else sample).dtype
    _save(w, out, a.format, dtype)
    print(f"extracted {a.tuned} - {a.base} -> {out}: {fit.summary()}; {len(fit.skipped)} target modules unchanged")
    return 0


def cmd_inspect(a) -> int:
    if a.plot:
        if Path(a.plot).suffix.lower() != ".png":
            raise UsageError(f"{a.plot}: the plot is written as a .png file")
        report.require_matplotlib()
    info = report.describe(a.file, share=a.share)
    print(json.dumps(info, indent=2) if a.json else report.render(info))
    if a.plot:
        report.plot_spectra(read_adapter(a.file), a.plot, share=a.share)
        print(f"wrote {a.plot}", file=sys.stderr)  # stderr, so --json output stays pure JSON
    return 0


def cmd_convert(a) -> int:
    out = _adapter_out(a.out)
    w = merge.diffusers_named(read_adapter(a.file))
    _save(w, out, a.to, _out_dtype(a.dtype, _tensors([(w, 1.0)])))
    print(f"converted {a.file} ({w.format}) -> {out} ({a.to}, {len(w.modules)} modules)")
    return 0


def cmd_ui(a) -> int:
    app = UI_APP
    if not app.is_file():
        raise UsageError(f"the UI is not installed here ({app} not found)")
    sys.path.insert(0, str(app.parents[1]))  # the app imports its siblings as `ui.*`
    spec = importlib.util.spec_from_file_location("ui.app", app)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run = getattr(module, "main", None)
    if run is None:
        raise UsageError(f"{app} has no main()")
    result = run(a.args) if inspect.signature(run).parameters else run()
    return result if isinstance(result, int) else 0


def _ranks(w: AdapterWeights) -> str:
    ranks = sorted(w.ranks)
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"


def _quiet() -> None:
    """No progress bars or warnings from diffusers/transformers: the CLI prints its own one-line results. Set through
    the environment, so commands that never load a model do not pay for importing diffusers."""
    for key, value in (("TQDM_DISABLE", "1"), ("DIFFUSERS_VERBOSITY", "error"), ("TRANSFORMERS_VERBOSITY", "error")):
        os.environ.setdefault(key, value)


if __name__ == "__main__":
    sys.exit(main())
