"""AdapterWeights: one adapter as plain tensors, independent of any file format or model.

This is the hand-off type between formats (read/write), the runtime (Adapters.load/export), the trainer and the
offline algebra in merge.py and lowrank.py. It lives in its own module so formats can build it without importing
file I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class AdapterError(ValueError):
    """A LoRA file or adapter is unusable. The message names the file (when there is one) and the problem."""


@dataclass
class LoRAModule:
    """One module's low-rank update: delta W = up @ down * alpha / rank (times the user weight)."""

    down: torch.Tensor  # [r, in] or [r, in, k, k]
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    alpha: float | None = None  # None means alpha = rank (scale 1), as kohya and PEFT read a missing alpha

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    @property
    def alpha_value(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def delta(self) -> torch.Tensor:
        """The full-rank update in fp32, shaped like the module's weight."""
        down, up = self.down.float(), self.up.float()
        d = up.flatten(1) @ down.flatten(1)
        if down.dim() == 4:
            return d.view(up.shape[0], *down.shape[1:]) * self.scale
        return d * self.scale


@dataclass
class AdapterWeights:
    """An adapter: canonical module name ("unet.<path>", "text_encoder.<path>") -> LoRAModule, plus metadata.

    `family` is the base model family ("sd1", "sd2", "sdxl" or "unknown"). `unet_naming` says whether UNet paths
    are diffusers paths or original-SD ("ldm") block names, which only the model's config can translate.
    """

    modules: dict[str, LoRAModule] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    family: str = "unknown"
    format: str = "unknown"
    unet_naming: str = "diffusers"
    source: str | None = None

    def part(self, name: str) -> str:
        return name.split(".", 1)[0]

    def parts(self) -> list[str]:
        return sorted({self.part(n) for n in self.modules})

    def count(self, part: str) -> int:
        return sum(1 for n in self.modules if self.part(n) == part)

    @property
    def ranks(self) -> set[int]:
        return {m.rank for m in self.modules.values()}

    def where(self) -> str:
        return self.source or "adapter"

    def validate(self) -> None:
        """Raise AdapterError for NaN/Inf values or inconsistent pairs. Shapes against a model are checked at load."""
        if not self.modules:
            raise AdapterError(f"{self.where()}: no LoRA modules found")
        for name, m in self.modules.items():
            if m.down.dim() not in (2, 4) or m.up.dim() != m.down.dim():
                raise AdapterError(f"{self.where()}: {name}: down {tuple(m.down.shape)} and up {tuple(m.up.shape)} "
                                   "are not a LoRA pair (expected 2-D or 4-D tensors of the same kind)")
            if m.rank < 1:
                raise AdapterError(f"{self.where()}: {name}: down {tuple(m.down.shape)} has rank 0 (an empty LoRA "
                                   "pair)")
            if m.up.shape[1] != m.rank:
                raise AdapterError(f"{self.where()}: {name}: down has rank {m.rank} but up has {m.up.shape[1]} columns")
            for what, t in (("down", m.down), ("up", m.up)):
                # One float64 sum per tensor: NaN or Inf anywhere makes it non-finite, and finite fp32 values cannot
                # overflow it. Much faster than an elementwise isfinite over every value.
                if not torch.isfinite(t.sum(dtype=torch.float64)):
                    raise AdapterError(f"{self.where()}: {name}: {what} contains NaN or Inf values")
            if m.alpha is not None and not (m.alpha == m.alpha and abs(m.alpha) != float("inf")):
                raise AdapterError(f"{self.where()}: {name}: alpha is NaN or Inf")
