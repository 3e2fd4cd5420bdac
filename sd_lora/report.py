"""What is in a LoRA file, and is its rank too high? The engine behind `sd-lora inspect`.

`describe` returns plain data (the CLI prints it as text or JSON): format and base family, module counts per part,
ranks, alphas, dtypes, size, the metadata people look for (title, trigger words, training settings), and per module
the effective rank: the smallest k whose top-k singular values keep 90% of Σσ² of ΔW. A rank-32 file whose modules
mostly have effective rank 3 was trained (or merged) at a higher rank than it needed; `sd-lora resize` fixes that.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from pathlib import Path

from sd_lora.adapter import atomic_write_bytes, read_adapter
from sd_lora.lowrank import rank_for_energy, spectrum
from sd_lora.weights import AdapterWeights

SHARE = 0.9
_FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "SDXL", "unknown": "unknown"}
_TITLE_KEYS = ("modelspec.title", "ss_output_name")
_TRAINING_KEYS = (
    "ss_sd_model_name", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
    "ss_network_args", "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_optimizer", "ss_lr_scheduler",
    "ss_max_train_steps", "ss_num_epochs", "ss_num_train_images", "ss_batch_size_per_device", "ss_resolution",
    "ss_mixed_precision", "ss_seed", "ss_training_started_at", "ss_training_finished_at", "modelspec.date",
    "modelspec.author", "modelspec.license", "modelspec.description", "sd_lora.blend",
)
_LONG = 300  # metadata values longer than this (thumbnails, tag lists, embedded configs) are summarised


def describe(path: str | os.PathLike, share: float = SHARE) -> dict:
    """Everything `inspect` shows, as JSON-ready data. Raises AdapterError for files that are not LoRA files."""
    path = Path(path)
    w = read_adapter(path)
    spectra = {name: spectrum(m) for name, m in w.modules.items()}
    modules = [{"name": name, "rank": m.rank, "alpha": m.alpha_value, "shape": list(m.up.shape[:1]) +
                list(m.down.shape[1:]), "dtype": str(m.down.dtype).removeprefix("torch."),
                "effective_rank": rank_for_energy(spectra[name], share)} for name, m in sorted(w.modules.items())]
    effective = sorted(m["effective_rank"] for m in modules)
    return {
        "file": str(path), "bytes": path.stat().st_size, "format": w.format, "family": w.family,
        "family_name": _FAMILY_NAMES.get(w.family, w.family), "unet_naming": w.unet_naming,
        "parts": {p: w.count(p) for p in w.parts()}, "modules": len(w.modules),
        "ranks": _counts(m.rank for m in w.modules.values()),
        "alphas": _counts(m.alpha_value for m in w.modules.values()),
        "dtypes": _counts(str(t.dtype).removeprefix("torch.") for m in w.modules.values() for t in (m.down, m.up)),
        "parameters": sum(m.down.numel() + m.up.numel() for m in w.modules.values()),
        "title": next((w.metadata[k] for k in _TITLE_KEYS if w.metadata.get(k)), None),
        "trigger_words": trigger_words(w.metadata),
        "training": {k: w.metadata[k] for k in _TRAINING_KEYS if w.metadata.get(k)},
        "metadata": {k: _short(v) for k, v in sorted(w.metadata.items())},
        "effective_rank": {"share": share, "min": effective[0], "median": effective[len(effective) // 2],
                           "max": effective[-1]},
        "module_details": modules,
    }


def _counts(values) -> dict[str, int]:
    """value -> how many modules, keys as strings (JSON) in numeric order."""
    counts = Counter(values)
    return {_num(v): counts[v] for v in sorted(counts, key=lambda v: (isinstance(v, str), v))}


def _num(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _short(value: str) -> str:
    if len(value) <= _LONG:
        return value
    kind = "data URI" if value.startswith("data:") else "text"
    return f"<{kind}, {len(value)} characters>"


def trigger_words(metadata: dict[str, str], top: int = 8) -> list[str]:
    """The trigger phrase when the file names one, else the most frequent training tags (kohya's ss_tag_frequency)."""
    phrase = metadata.get("modelspec.trigger_phrase")
    if phrase:
        return [t.strip() for t in phrase.split(",") if t.strip()]
    try:
        freq = json.loads(metadata.get("ss_tag_frequency") or "{}")
    except json.JSONDecodeError:
        return []
    counts: Counter = Counter()
    for tags in freq.values() if isinstance(freq, dict) else ():
        if isinstance(tags, dict):
            counts.update({str(k).strip(): int(v) for k, v in tags.items() if isinstance(v, (int, float))})
    return [tag for tag, _ in counts.most_common(top)]


def render(info: dict, modules: bool = True) -> str:
    """The human-readable report."""
    parts = ", ".join(f"{p} {n}" for p, n in info["parts"].items())
    eff = info["effective_rank"]
    lines = [
        f"file         {info['file']} ({info['bytes'] / 2**20:.2f} MB)",
        f"format       {info['format']}" + (" (UNet keys in original-SD block names)"
                                            if info["unet_naming"] == "ldm" else ""),
        f"base family  {info['family_name']}",
        f"modules      {info['modules']}: {parts}",
        f"ranks        {_hist(info['ranks'])}",
        f"alphas       {_hist(info['alphas'])}",
        f"dtype        {_hist(info['dtypes'], 'tensors')}",
        f"parameters   {info['parameters']:,}",
        f"title        {info['title'] or '-'}",
        f"trigger      {', '.join(info['trigger_words']) or '-'}",
        f"effective rank ({eff['share']:.0%} of Σσ²): min {eff['min']}, median {eff['median']}, max {eff['max']}",
    ]
    if info["training"]:
        lines.append("training")
        lines += [f"  {k:<28} {_short(v)}" for k, v in info["training"].items()]
    others = {k: v for k, v in info["metadata"].items() if k not in info["training"]}
    if others:
        lines.append("metadata")
        lines += [f"  {k:<28} {v}" for k, v in others.items()]
    if modules:
        lines.append(f"{'module':<80} {'rank':>4} {'alpha':>7} {'eff.':>4}")
        lines += [f"{m['name']:<80} {m['rank']:>4} {m['alpha']:>7g} {m['effective_rank']:>4}"
                  for m in info["module_details"]]
    return "\n".join(lines)


def _hist(counts: dict[str, int], what: str = "modules") -> str:
    if len(counts) == 1:
        return f"{next(iter(counts))} (all {sum(counts.values())} {what})"
    return ", ".join(f"{v} ×{n}" for v, n in counts.items())


def require_matplotlib():
    """pyplot on the Agg backend, or a clear error (matplotlib is optional: the dev extra installs it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib, which is not installed: pip install matplotlib") from None
    return plt


def plot_spectra(w: AdapterWeights, out: str | os.PathLike, share: float = SHARE) -> Path:
    """Save a PNG of every module's singular values (normalised to the largest), one line per module, coloured by
    part, with the median effective rank marked: a fast-falling curve means the rank is higher than it needs."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    colours = {"unet": "tab:blue", "text_encoder": "tab:orange", "text_encoder_2": "tab:green"}
    effective = []
    for name, m in w.modules.items():
        s = spectrum(m)
        effective.append(rank_for_energy(s, share))
        if float(s[0]) > 0:
            ax.plot(range(1, len(s) + 1), (s / s[0]).tolist(), color=colours.get(w.part(name), "gray"),
                    alpha=0.25, linewidth=0.8)
    for part in w.parts():
        ax.plot([], [], color=colours.get(part, "gray"), label=f"{part} ({w.count(part)} modules)")
    median = sorted(effective)[len(effective) // 2]
    ax.axvline(median, color="black", linestyle="--", linewidth=1,
               label=f"median effective rank {median} ({share:.0%} of Σσ²)")
    ax.set(yscale="log", xlabel="singular value index", ylabel="σ / σ₁",
           title=f"{Path(w.where()).name}: singular-value spectra of ΔW")
    ax.legend(loc="lower left")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return Path(out)
