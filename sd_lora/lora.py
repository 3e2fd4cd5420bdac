"""LoRA math on one layer: named adapters on a frozen Linear, 1x1 Conv2d or kxk Conv2d.

    y = base(x) + sum_i  w_i * (alpha_i / r_i) * up_i(down_i(x))

Nothing here knows about files, module names or pipelines. Three rules shape the code:

* Scales are derived, never stored. A layer keeps each adapter's raw down/up/alpha; the user weight w_i lives in one
  `Blend` object shared by every layer of a model part and is read at forward or fold time. Changing weights, a
  temporary scale or removing an adapter therefore cannot leave a stale scale behind (diffusers has two bugs of
  exactly that kind).
* Live forward concatenates the active adapters along the rank axis, with their scales folded into `up`, so any
  number of adapters costs one down- and one up-projection. Per-sample routing multiplies the rank axis by a
  [batch, rank] matrix, so it is still two projections.
* Folding (auto mode, merge) always starts from the saved original weight, computed in fp32 and cast once, so merging
  twice or re-weighting while merged never drifts, and unfolding restores the weight bit for bit. On the CPU the
  original is the weight's own tensor (the folded weight is a new one), so saving it costs no copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

Route = list  # list[dict[str, float]]: one {adapter: weight} per sample


@dataclass
class Blend:
    """State shared by all LoRA layers of one model part (UNet or text encoder).

    `weights` maps adapter name -> user weight; adapters not in it contribute nothing. `route`, when set, gives one
    {name: weight} per sample and overrides `weights` for the live path. `version` changes on every edit so layers can
    cache their concatenated matrices and folds.
    """

    weights: dict[str, float] = field(default_factory=dict)
    route: Route | None = None
    scale: float = 1.0
    version: int = 0

    def bump(self) -> None:
        self.version += 1

    def weight(self, name: str) -> float:
        return self.weights.get(name, 0.0) * self.scale


class AdapterParams(nn.ParameterDict):
    """A ParameterDict keyed by adapter name, where a name may hold dots ("add_detail_v1.5", the stem of a file people
    share). torch refuses dots in parameter names, so each entry is stored under its name with "%" and "." escaped
    ("add_detail_v1%2E5"); the keys seen through the dict are the names as given."""

    def _key_to_attr(self, key: str) -> str:
        return super()._key_to_attr(key).replace("%", "%25").replace(".", "%2E")


class LoRALayer(nn.Module):
    """A frozen base layer plus any number of named low-rank adapters."""

    def __init__(self, base: nn.Linear | nn.Conv2d, blend: Blend):
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"LoRA wraps nn.Linear or nn.Conv2d, not {type(base).__name__}")
        self.base = base
        self.blend = blend
        self.is_conv = isinstance(base, nn.Conv2d)
        self.down = AdapterParams()
        self.up = AdapterParams()
        self.alpha: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        # Original weight, kept off the accelerator, restored bit for bit on unfold. Saved lazily on first fold.
        self.original: torch.Tensor | None = None
        self.folded_version: int | None = None  # blend.version folded into base.weight, None when unfolded
        self._cache_key = None
        self._cache: tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # ---- adapters ---------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.down.keys())

    def shapes_for(self, rank: int, kernel: bool = True) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Expected (down, up) shapes for a rank-`rank` adapter on this layer."""
        if self.is_conv:
            k = self.base.kernel_size
            return (rank, self.base.in_channels // self.base.groups, *k), (self.base.out_channels, rank, 1, 1)
        return (rank, self.base.in_features), (self.base.out_features, rank)

    def add(self, name: str, down: torch.Tensor, up: torch.Tensor, alpha: float | None = None,
            trainable: bool = False, dropout: float = 0.0) -> None:
        """Add adapter `name`. Tensors are copied; trainable adapters are fp32 parameters."""
        if name in self.down:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        rank = down.shape[0]
        want_down, want_up = self.shapes_for(rank)
        if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
            raise ValueError(f"adapter {name!r}: down {tuple(down.shape)} / up {tuple(up.shape)} do not fit a layer "
                             f"expecting {want_down} / {want_up}")
        dtype = torch.float32 if trainable else self.base.weight.dtype
        device = self.base.weight.device
        self.down[name] = nn.Parameter(down.detach().to(device, dtype, copy=True), requires_grad=trainable)
        self.up[name] = nn.Parameter(up.detach().to(device, dtype, copy=True), requires_grad=trainable)
        self.alpha[name] = float(rank if alpha is None else alpha)
        self.dropout[name] = dropout
        self.blend.bump()

    def add_new(self, name: str, rank: int, alpha: float | None = None, init: str = "kaiming",
                dropout: float = 0.0, generator: torch.Generator | None = None) -> None:
        """Add a fresh trainable adapter: random down, zero up, so training starts from the base model."""
        down_shape, up_shape = self.shapes_for(rank)
        down = torch.empty(down_shape)
        if init == "kaiming":
            fan_in = math.prod(down_shape[1:])
            bound = 1.0 / math.sqrt(fan_in)  # what nn.init.kaiming_uniform_(a=sqrt(5)) gives, as PEFT uses
            down.uniform_(-bound, bound, generator=generator)
        elif init == "gaussian":
            down.normal_(0.0, 1.0 / rank, generator=generator)
        else:
            raise ValueError(f"unknown init {init!r}: use 'kaiming' or 'gaussian'")
        self.add(name, down, torch.zeros(up_shape), alpha, trainable=True, dropout=dropout)

    def remove(self, name: str) -> None:
        del self.down[name], self.up[name], self.alpha[name], self.dropout[name]
        self.blend.bump()

    def delta(self) -> torch.Tensor:
        """sum_i w_i (alpha_i/r_i) up_i @ down_i over the current blend, in fp32, shaped like the base weight."""
        active = [n for n in self.names if self.blend.weight(n) != 0.0]
        if not active:
            return torch.zeros(self.base.weight.shape, dtype=torch.float32, device=self.base.weight.device)
        down, up = self._fold_factors(active)
        return (up @ down).view(self.base.weight.shape)

    def _scale(self, name: str, weight: float) -> float:
        return weight * self.alpha[name] / self.down[name].shape[0]

    # ---- folding ----------------------------------------------------------------------------------------------
    @property
    def folded(self) -> bool:
        return self.folded_version is not None

    def fold(self) -> None:
        """Put base + current blend into base.weight (fp32 sum, one cast). No-op when already current.

        The original weight is saved on the first fold. On the CPU that costs nothing: the weight's own tensor
        becomes the original and the folded weight is a new tensor (later folds write into it in place). On an
        accelerator the original is copied to the CPU, off the device's memory."""
        if self.folded_version == self.blend.version:
            return
        weight = self.base.weight
        if self.original is None:
            on_cpu = weight.device.type == "cpu"
            self.original = weight.data if on_cpu else weight.detach().to("cpu", copy=True)
        active = [n for n in self.names if self.blend.weight(n) != 0.0]
        with torch.no_grad():
            if not active:  # nothing to add: the original values, bit for bit
                if self._writable_in_place():
                    weight.copy_(self.original)  # kept in the folded tensor: the next blend re-folds in place
                else:
                    self._restore()
            else:
                down, up = self._fold_factors(active)
                rows = weight.shape[0]
                if self._writable_in_place():  # one fused op straight into the weight: no temporaries
                    torch.addmm(self.original.flatten(1), up, down, out=weight.data.view(rows, -1))
                else:
                    fused = torch.addmm(self.original.to(weight.device, torch.float32).flatten(1), up, down)
                    fused = fused.view(weight.shape).to(weight.dtype)
                    if self._shares_original():
                        weight.data = fused  # the weight still is the original: give it a tensor of its own
                    else:
                        weight.copy_(fused)
        self.folded_version = self.blend.version

    def _shares_original(self) -> bool:
        return self.original is not None and self.base.weight.data.data_ptr() == self.original.data_ptr()

    def _writable_in_place(self) -> bool:
        weight = self.base.weight
        return (weight.dtype == torch.float32 and weight.device == self.original.device and weight.is_contiguous()
                and not self._shares_original())

    def _restore(self) -> None:
        """base.weight = the original: on the CPU by pointing back at the original tensor, elsewhere by a copy."""
        weight = self.base.weight
        if self._shares_original():
            return
        if weight.device == self.original.device and weight.dtype == self.original.dtype:
            weight.data = self.original
        else:  # the model moved (another device or dtype) since the original was saved
            weight.copy_(self.original.to(weight.device, weight.dtype))

    def extra_bytes(self) -> int:
        """Memory the saved original takes beyond the weight itself (none while the weight is the original)."""
        if self.original is None or self._shares_original():
            return 0
        return self.original.nbytes

    def _fold_factors(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (down [R, in*k*k], up [out, R]) with each adapter's scale folded into its columns of up."""
        down = torch.cat([self.down[n].detach().float().flatten(1) for n in names])
        up = torch.cat([self.up[n].detach().float().flatten(1) * self._scale(n, self.blend.weight(n)) for n in names],
                       dim=1)
        return down, up

    def unfold(self) -> None:
        """Restore the original weight bit for bit."""
        if self.folded_version is None:
            return
        with torch.no_grad():
            self._restore()
        self.folded_version = None

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.folded_version is not None:
            return out  # the whole blend is inside base.weight (training runs unfolded, in live mode)
        frozen, trainable = [], []  # one pass, few lookups: this runs for every targeted layer on every step
        for name, down in self.down.items():
            (trainable if down.requires_grad else frozen).append((name, down))
        if frozen:
            out = self._live_frozen(x, out, [n for n, _ in frozen])
        for name, down in trainable:
            out = out + self._live_trainable(x, name, down, out.dtype)
        return out

    def _concat(self, names: list[str], dtype: torch.dtype) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Concatenated (names, down, up, per-rank-column scale) for the frozen adapters, cached per blend version."""
        key = (self.blend.version, dtype, self.blend.route is None, self.base.weight.device)  # pipe.to() moves it
        if self._cache_key != key:
            active = names if self.blend.route is not None else [n for n in names if self.blend.weight(n) != 0.0]
            if active:
                down = torch.cat([self.down[n] for n in active]).to(dtype)
                up = torch.cat([self.up[n] for n in active], dim=1)
                col = torch.cat([torch.full((self.down[n].shape[0],), self.alpha[n] / self.down[n].shape[0])
                                 for n in active]).to(up.device)
                if self.blend.route is None:  # fold the user weights into up: nothing to do per call
                    w = torch.cat([torch.full((self.down[n].shape[0],), self.blend.weight(n)) for n in active])
                    up = up.float() * (col * w.to(up.device)).view(1, -1, *([1] * (up.dim() - 2)))
                self._cache = (active, down, up.to(dtype), col)
            else:
                self._cache = ([], None, None, None)
            self._cache_key = key
        return self._cache

    def _project(self, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, mask: torch.Tensor | None):
        if self.is_conv:
            b = self.base
            h = F.conv2d(x, down, None, b.stride, b.padding, b.dilation, b.groups)
            if mask is not None:
                h = h * mask[:, :, None, None]
            return F.conv2d(h, up)
        h = F.linear(x, down)
        if mask is not None:
            h = h * mask.view(mask.shape[0], *([1] * (h.dim() - 2)), mask.shape[1])
        return F.linear(h, up)

    def _live_frozen(self, x: torch.Tensor, out: torch.Tensor, names: list[str]) -> torch.Tensor:
        active, down, up, col = self._concat(names, x.dtype)
        if not active:
            return out
        mask = None
        if self.blend.route is not None:
            mask = self._route_mask(active, col, x.shape[0]).to(x.device, x.dtype)
        return out + self._project(x, down, up, mask)

    def _route_mask(self, active: list[str], col: torch.Tensor, batch: int) -> torch.Tensor:
        """[batch, rank] matrix: column scale times each sample's weight for the adapter owning that column."""
        route = self.blend.route
        if batch % len(route):
            raise ValueError(f"route has {len(route)} entries but the batch has {batch} samples; the batch must be "
                             "a multiple of the route (classifier-free guidance doubles it)")
        rows = []
        for sample in route:
            rows.append(torch.cat([torch.full((self.down[n].shape[0],), sample.get(n, 0.0) * self.blend.scale)
                                   for n in active]))
        mask = torch.stack(rows).to(col.device) * col
        return mask.repeat(batch // len(route), 1)

    def _live_trainable(self, x: torch.Tensor, name: str, down: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The trainable adapter's update, computed in its own (fp32) precision and returned in `dtype`, the base
        layer's output dtype: fp16 under fp16 autocast even where x is fp32 (after a LayerNorm), so attention and
        everything after it keep running in half precision, as with PEFT."""
        up = self.up[name]
        h = x if x.dtype == down.dtype else x.to(down.dtype)
        p = self.dropout[name]
        if p and self.training:
            h = F.dropout(h, p)
        scale = self.blend.weight(name) * self.alpha[name] / down.shape[0]
        if self.is_conv:
            b = self.base
            h = F.conv2d(h, down, None, b.stride, b.padding, b.dilation, b.groups)
            y = F.conv2d(h, up)
        else:
            y = F.linear(F.linear(h, down), up)
        y = y * scale
        return y if y.dtype == dtype else y.to(dtype)
