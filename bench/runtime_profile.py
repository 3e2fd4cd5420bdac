"""bench/runtime.py --profile: where our adapter load and fold spend their time, against drop-in alternatives
measured on the same data (the evidence for the suggestions in bench/RESULTS.md, "runtime", "Where the time goes").
Uses sd_lora internals. Run it through `HF_HUB_OFFLINE=1 .venv/bin/python bench/runtime.py --profile`."""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from common import clock, median, random_adapter

import sd_lora


def profile_costs(pipe, folder: Path, reps: int = 5) -> None:
    """Load phases and the fold, against drop-in alternatives measured on the same data. Uses sd_lora internals."""
    import resource

    from sd_lora import adapter as adapter_io
    from sd_lora.formats import kohya

    def t(fn, n=reps):
        runs = []
        for _ in range(n):
            gc.collect()
            runs.append(clock(fn)[0])
        return median(runs) * 1e3

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    print("\n== profile: load phases (kohya full set, rank 16, fp16), ms")
    full = random_adapter({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, preset="full", rank=16, seed=100)
    attn = [random_adapter({"unet": pipe.unet}, preset="attn", rank=16, alpha=4.0 + 2 * i, seed=i) for i in range(8)]
    path = sd_lora.save_adapter(full, folder / "kohya_full_r16.safetensors")
    tensors, md = adapter_io._load_tensors(path, False)
    w = kohya.read(tensors, md, source=str(path))
    lora = sd_lora.attach(pipe)
    flat = [x for m in w.modules.values() for x in (m.down, m.up)]
    rows = {
        "read bytes + safetensors load": lambda: adapter_io._load_tensors(path, False),
        "formats.kohya.read": lambda: kohya.read(tensors, md, source=str(path)),
        "AdapterWeights.validate (isfinite(t).all() per tensor)": w.validate,
        "  alternative: isfinite(t.sum(dtype=float64)) per tensor":
            lambda: [bool(torch.isfinite(x.sum(dtype=torch.float64))) for x in flat],
        "read_adapter total": lambda: sd_lora.read_adapter(path),
        "lora.load(AdapterWeights) + remove": lambda: (lora.load(w, name="k"), lora.remove("k")),
        "LoRALayer.add copies: .to(fp32).clone()": lambda: [x.to("cpu", torch.float32).clone() for x in flat],
        "  alternative: .to(fp32, copy=True)": lambda: [x.to("cpu", torch.float32, copy=True) for x in flat],
    }
    for label, fn in rows.items():
        print(f"  {label:58s} {t(fn):7.1f}")

    print("\n== profile: fold (set_weights + fold every layer), s; minor page faults")
    for label, adapters in (("8 x rank 16 on attention (128 modules)", dict(zip([f"a{i}" for i in range(8)], attn))),
                            ("1 x kohya full set (264 modules)", {"k": full})):
        lora.detach()
        lora = sd_lora.attach(pipe)
        for name, a in adapters.items():
            lora.load(a, name=name)
        f0 = faults()
        first = clock(lora.merge)[0]
        print(f"  {label}: first fold {first:.3f} s ({faults() - f0} faults), memory "
              f"added by folding {lora.copy_bytes() / 2**20:.0f} MB")
        lora.unmerge()
        _compare_folds(lora, list(adapters), reps, faults)
        lora.unmerge()
    lora.detach()


def _compare_folds(lora, names: list[str], reps: int, faults) -> None:
    """Time a re-fold after a weight change (LoRALayer.fold: one fused addmm into the folded weight)."""
    layers = [layer for part in lora.layers.values() for layer in part.values()]
    times, flts = [], []
    for r in range(reps):
        lora.set_weights({n: 0.5 + 0.01 * r + 0.1 * i for i, n in enumerate(names)})
        gc.collect()
        f0 = faults()
        with torch.no_grad():
            times.append(clock(lambda: [layer.fold() for layer in layers])[0])
        flts.append(faults() - f0)
    print(f"    re-fold: median {median(times):.3f} s, {median(flts):.0f} faults "
          f"(all: {', '.join(f'{x:.3f}' for x in times)})")
