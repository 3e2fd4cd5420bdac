"""Low-rank algebra on LoRA modules: spectra, effective rank, resize by SVD, and extracting a LoRA from two
checkpoints, with reports of what each truncation kept.

SVDs run on the thin factors (QR of up and downᵀ, then an r×r SVD), so they cost O((in+out)·r²) and never form ΔW,
except in `extract`, where ΔW is all there is. The CLI and the UI call these; nothing here prints.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

import torch

from sd_lora.targets import PARTS, select
from sd_lora.weights import AdapterError, AdapterWeights, LoRAModule

# kohya's LoCon set, added to the transformer targets by `extract --conv-rank`: resnets and resamplers.
_CONV_TARGETS = r".*(resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|(down|up)samplers\.0\.conv)"


# ---- reports --------------------------------------------------------------------------------------------------
@dataclass
class ModuleFit:
    name: str
    rank_before: int
    rank_after: int
    energy: float  # Σσ² of the scaled ΔW
    kept: float  # share of it the new rank keeps

    @property
    def error(self) -> float:
        """Relative Frobenius error ‖ΔW − ΔW_k‖ / ‖ΔW‖ = sqrt(1 − kept)."""
        return math.sqrt(max(0.0, 1.0 - self.kept))


@dataclass
class FitReport:
    """What an SVD truncation kept, per module and overall: answers "how much did resizing cost?"."""

    modules: list[ModuleFit] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # extract: modules identical in both checkpoints

    @property
    def error(self) -> float:
        total = sum(m.energy for m in self.modules)
        lost = sum(m.energy * (1.0 - m.kept) for m in self.modules)
        return math.sqrt(max(0.0, lost) / total) if total > 0 else 0.0

    def summary(self) -> str:
        if not self.modules:
            return "no modules"
        kept = sorted(m.kept for m in self.modules)
        worst = max(self.modules, key=lambda m: m.error)
        ranks = sorted({m.rank_after for m in self.modules})
        return (f"{len(self.modules)} modules, rank {_span(sorted({m.rank_before for m in self.modules}))} -> "
                f"{_span(ranks)}; energy kept min {kept[0]:.4f}, median {kept[len(kept) // 2]:.4f}; relative error "
                f"{self.error:.4g} overall, worst {worst.error:.4g} ({worst.name})")


def _span(values: list[int]) -> str:
    return str(values[0]) if values[0] == values[-1] else f"{values[0]}..{values[-1]}"


# ---- SVD: spectra, resize, extract ------------------------------------------------------------------------------------
def _thin_svd(m: LoRAModule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD (U, S, Vh) of the unscaled up @ down (flattened to 2-D) from QR of the thin factors."""
    qu, ru = torch.linalg.qr(m.up.float().flatten(1))
    qd, rd = torch.linalg.qr(m.down.float().flatten(1).T)
    u, s, vh = torch.linalg.svd(ru @ rd.T)
    return qu @ u, s, vh @ qd.T


def spectrum(m: LoRAModule) -> torch.Tensor:
    """Singular values of the module's scaled ΔW, largest first."""
    return _thin_svd(m)[1] * abs(m.scale)


def rank_for_energy(s: torch.Tensor, share: float) -> int:
    """The smallest k whose top-k singular values keep `share` of Σσ² (at least 1)."""
    energy = s.double() ** 2
    total = float(energy.sum())
    if total == 0.0:
        return 1
    cumulative = torch.cumsum(energy, 0) / total
    return min(int((cumulative < share - 1e-9).sum()) + 1, len(s))


def effective_rank(m: LoRAModule, share: float = 0.9) -> int:
    return rank_for_energy(spectrum(m), share)


def _truncate(u, s, vh, k: int, down_shape, up_shape, alpha: float) -> LoRAModule:
    """Rank-k factors with √σ on each side, so up and down keep similar magnitudes (kinder to fp16)."""
    root = s[:k].sqrt()
    up = (u[:, :k] * root).reshape(up_shape[0], k, *up_shape[2:])
    down = (root[:, None] * vh[:k]).reshape(k, *down_shape[1:])
    return LoRAModule(down.contiguous(), up.contiguous(), alpha)


def resize(w: AdapterWeights, rank: int | None = None, energy: float | None = None) -> tuple[AdapterWeights, FitReport]:
    """Reduce each module's rank by SVD: to `rank`, or to the smallest rank keeping `energy` of Σσ². Alpha becomes
    scale·k, so α/r (what a user's weight multiplies) is unchanged. A module already at or below the target rank is
    kept as it is, bit for bit."""
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank or energy")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    modules, report = {}, FitReport()
    for name, m in w.modules.items():
        u, s, vh = _thin_svd(m)
        k = min(rank if rank is not None else rank_for_energy(s, energy), len(s))
        e2 = (s.double() * m.scale) ** 2
        if k >= m.rank:
            modules[name] = m
            report.modules.append(ModuleFit(name, m.rank, m.rank, float(e2.sum()), 1.0))
            continue
        modules[name] = _truncate(u, s, vh, k, m.down.shape, m.up.shape, m.scale * k)
        kept = float(e2[:k].sum() / e2.sum()) if float(e2.sum()) > 0 else 1.0
        report.modules.append(ModuleFit(name, m.rank, k, float(e2.sum()), kept))
    stale = ("ss_network_dim", "ss_network_alpha", "sshs_model_hash")  # recomputed when the file is written
    metadata = {k: v for k, v in w.metadata.items() if k not in stale}
    return replace(w, modules=modules, metadata=metadata), report


def extract(base: dict, tuned: dict, rank: int, conv_rank: int | None = None, family: str = "unknown",
            min_change: float = 1e-6) -> tuple[AdapterWeights, FitReport]:
    """A LoRA approximating tuned − base. `base`/`tuned` map canonical module names to weights or zero-argument
    loaders (so checkpoints stream one module at a time). Targets: kohya's transformer and text-encoder set; with
    `conv_rank`, also the resnets and resamplers (kxk convs at conv_rank, their Linear/1x1 at rank). Modules whose
    change is below `min_change`·‖W‖ (float rounding from a save/load round trip, not training) are skipped."""
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise ValueError("ranks must be at least 1")
    modules, report = {}, FitReport()
    for name in extract_targets(sorted(set(base) & set(tuned)), conv_rank is not None):
        b, t = _get(base[name]), _get(tuned[name])
        if b.shape != t.shape:
            raise AdapterError(f"{name}: the checkpoints disagree on its shape ({tuple(b.shape)} vs {tuple(t.shape)})")
        diff = t.float() - b.float()
        if float(diff.norm()) <= min_change * float(b.float().norm()):
            report.skipped.append(name)
            continue
        u, s, vh = torch.linalg.svd(diff.flatten(1), full_matrices=False)
        k = min(conv_rank if diff.dim() == 4 and diff.shape[2:] != (1, 1) else rank, len(s))
        up_shape = (diff.shape[0], k, 1, 1) if diff.dim() == 4 else (diff.shape[0], k)
        modules[name] = _truncate(u, s, vh, k, diff.shape, up_shape, float(k))
        e2 = s.double() ** 2
        report.modules.append(ModuleFit(name, len(s), k, float(e2.sum()), float(e2[:k].sum() / e2.sum())))
    if not modules:
        raise AdapterError("the two checkpoints are identical on every LoRA target module: nothing to extract")
    return AdapterWeights(modules, {}, family=family, format="kohya"), report


def extract_targets(names: list[str], conv: bool) -> list[str]:
    """Canonical module names that extract covers, in order."""
    out = []
    for part in PARTS:
        paths = [n.split(".", 1)[1] for n in names if n.startswith(part + ".")]
        chosen = set(select(paths, part, "full"))
        if conv and part == "unet":
            chosen |= {p for p in paths if re.fullmatch(_CONV_TARGETS, p)}
        out += [f"{part}.{p}" for p in paths if p in chosen]
    return out


def _get(x) -> torch.Tensor:
    return x() if callable(x) else x
