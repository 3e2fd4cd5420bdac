"""Adapters: the controller attached to a diffusers pipeline. It owns injection of LoRA layers into the UNet and the
text encoder(s), and all adapter state: which are loaded, their weights, routing, merged or not.

    lora = sd_lora.attach(pipe)            # mode="auto": fold the blend into the weights before each run that needs it
    lora.load("mozart.safetensors")
    lora.set_weights({"mozart": 0.8})
    pipe("a violin")

It works on any object with `.unet` and an optional `.text_encoder` / `.text_encoder_2` (None means UNet only), so
every SD pipeline class fits. Loading is validate-then-apply: every key, shape and name is checked before the first
module is touched, so a failed load leaves the pipeline exactly as it was.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sd_lora.adapter import read_adapter, save_adapter
from sd_lora.formats.detect import model_family
from sd_lora.lora import Blend, LoRALayer
from sd_lora.targets import PARTS, module_table, normalize, select, strip_text_model
from sd_lora.weights import AdapterError, AdapterWeights, LoRAModule

MODES = ("auto", "live")


@dataclass
class AdapterInfo:
    name: str
    source: str | None
    format: str
    family: str
    metadata: dict[str, str]
    modules: dict[str, int]  # part -> number of LoRA modules
    ranks: list[int]
    trainable: bool = False


class Adapters:
    """Named LoRA adapters on a pipeline's UNet and text encoder(s). See the module docstring."""

    def __init__(self, pipe, mode: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: use 'auto' or 'live'")
        if getattr(pipe, "unet", None) is None:
            raise TypeError(f"{type(pipe).__name__} has no .unet; attach needs a Stable Diffusion pipeline")
        self.pipe = pipe
        self.mode = mode
        self.models: dict[str, nn.Module] = {p: m for p in PARTS if (m := getattr(pipe, p, None)) is not None}
        self.blends = {p: Blend() for p in self.models}
        self.layers: dict[str, dict[str, LoRALayer]] = {p: {} for p in self.models}
        self.adapters: dict[str, AdapterInfo] = {}
        self.merged = False
        # normalized name -> (real path, base module), built before any wrapping so it stays valid afterwards.
        self._tables = {p: {k: (v, m.get_submodule(v)) for k, v in module_table(m).items()}
                        for p, m in self.models.items()}
        self._synced: dict[str, tuple] = {}
        self._hooks = [m.register_forward_pre_hook(self._make_hook(p)) for p, m in self.models.items()]

    # ---- loading ------------------------------------------------------------------------------------------------
    def load(self, source: str | os.PathLike | AdapterWeights, name: str | None = None, weight: float = 1.0,
             allow_pickle: bool = False) -> AdapterInfo:
        """Load an adapter file (any supported format) or AdapterWeights under `name` (default: the file stem)."""
        if isinstance(source, AdapterWeights):
            weights = source
            weights.validate()  # a file is validated as it is read; weights built in code are checked here
        else:
            weights = read_adapter(source, allow_pickle=allow_pickle)
        where = weights.where()
        weight = _finite(weight, f"adapter {name or Path(where).stem!r}")
        name = name or (Path(weights.source).stem if weights.source else None)
        if not name:
            raise ValueError("give the adapter a name")
        if name in self.adapters:
            raise AdapterError(f"{where}: an adapter named {name!r} is already loaded; remove it or pick another name")
        plan = self._plan(weights, where)
        for part, path, module in plan:  # validated above: nothing below can fail on user input
            self._layer(part, path).add(name, module.down, module.up, module.alpha)
        for part in {p for p, _, _ in plan}:
            self.blends[part].weights[name] = float(weight)
            self.blends[part].bump()
        info = AdapterInfo(name, weights.source, weights.format, weights.family, dict(weights.metadata),
                           {p: sum(1 for q, _, _ in plan if q == p) for p in self.models}, sorted(weights.ranks))
        self.adapters[name] = info
        self._refold_if_merged()
        return info

    def _plan(self, weights: AdapterWeights, where: str) -> list[tuple[str, str, LoRAModule]]:
        """Map every module of `weights` to (part, real module path, module with model-shaped tensors), or raise."""
        family = model_family(self.models["unet"])
        if weights.family not in ("unknown", family):
            raise AdapterError(f"{where}: this adapter is for {_FAMILY_NAMES[weights.family]} but the pipeline is "
                               f"{_FAMILY_NAMES[family]}")
        plan, unmatched, seen = [], [], {}
        for key, module in weights.modules.items():
            part, path = key.split(".", 1)
            if part not in self.models:
                if part == "text_encoder" and "unet" in self.models and len(self.models) == 1:
                    continue  # a UNet-only controller ignores text-encoder modules by design
                unmatched.append(key)
                continue
            if part == "unet" and weights.unet_naming == "ldm":
                path = self._from_ldm(path)
            hit = self._tables[part].get(normalize(path)) if path else None
            if hit is None:
                unmatched.append(key)
                continue
            if (part, hit[0]) in seen:  # two names for one module: loading both would fail half-way
                raise AdapterError(f"{where}: {seen[part, hit[0]]} and {key} name the same module of this model")
            seen[part, hit[0]] = key
            plan.append((part, hit[0], self._fit(module, hit[1], f"{where}: {key}")))
        if unmatched:
            fam = "" if weights.family == "unknown" else f" (the file says {_FAMILY_NAMES[weights.family]})"
            raise AdapterError(f"{where}: {len(unmatched)} of {len(weights.modules)} LoRA modules match no module of "
                               f"this model{fam}, e.g. {', '.join(unmatched[:3])}; is it made for another base model?")
        return plan

    def _from_ldm(self, path: str) -> str | None:
        from sd_lora.formats import ldm

        try:
            return ldm.unet_path_from_ldm(path, dict(self.models["unet"].config))
        except KeyError:
            return None

    @staticmethod
    def _fit(module: LoRAModule, base: nn.Module, where: str) -> LoRAModule:
        """Check shapes against the base module; accept 2-D tensors for 1x1 convs and [r, in, 1, 1] for Linear."""
        down, up = module.down, module.up
        if isinstance(base, nn.Conv2d):
            if down.dim() == 2 and base.kernel_size == (1, 1):
                down, up = down[:, :, None, None], up[:, :, None, None]
            want_down = (down.shape[0], base.in_channels // base.groups, *base.kernel_size)
            want_up = (base.out_channels, down.shape[0], 1, 1)
        else:
            if down.dim() == 4 and down.shape[2:] == (1, 1) and up.shape[2:] == (1, 1):
                down, up = down.flatten(1), up.flatten(1)
            want_down, want_up = (down.shape[0], base.in_features), (base.out_features, down.shape[0])
        if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
            raise AdapterError(f"{where}: shape mismatch: down {tuple(module.down.shape)}, up {tuple(module.up.shape)}"
                               f" but this model's module needs {want_down}, {want_up}")
        return LoRAModule(down, up, module.alpha)

    def _layer(self, part: str, path: str) -> LoRALayer:
        layer = self.layers[part].get(path)
        if layer is None:
            model = self.models[part]
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            layer = LoRALayer(getattr(parent, child), self.blends[part])
            setattr(parent, child, layer)
            self.layers[part][path] = layer
        return layer

    # ---- training -----------------------------------------------------------------------------------------------
    def add_trainable(self, name: str, rank: int = 4, alpha: float | None = None, preset: str = "cross-attn",
                      text_encoder: bool = True, init: str = "kaiming", dropout: float = 0.0,
                      seed: int = 0) -> dict[str, list[nn.Parameter]]:
        """Add a fresh trainable adapter on the modules of `preset`. Returns its fp32 parameters per part."""
        if name in self.adapters:
            raise AdapterError(f"an adapter named {name!r} is already loaded")
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        generator = torch.Generator().manual_seed(seed)
        parts = [p for p in self.models if p == "unet" or (text_encoder and p.startswith("text_encoder"))]
        chosen = {part: select([real for real, _ in self._tables[part].values()], part, preset) for part in parts}
        if not chosen["unet"]:  # checked before anything changes: a typo'd or foreign model must not train nothing
            raise AdapterError(f"the {preset!r} preset matches no module of this UNet; nothing to train")
        params: dict[str, list[nn.Parameter]] = {}
        for part in parts:
            for path in chosen[part]:
                real = self._tables[part][normalize(path)][0]
                layer = self._layer(part, real)
                layer.add_new(name, rank, alpha, init=init, dropout=dropout, generator=generator)
                params.setdefault(part, []).extend([layer.down[name], layer.up[name]])
            self.blends[part].weights[name] = 1.0
            self.blends[part].bump()
        self.adapters[name] = AdapterInfo(name, None, "trained", model_family(self.models["unet"]), {},
                                          {p: len(v) // 2 for p, v in params.items()}, [rank], trainable=True)
        return params

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for layers in self.layers.values() for layer in layers.values()
                for p in layer.parameters() if p.requires_grad]

    # ---- blending -----------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    def set_weights(self, weights: dict[str, float | dict[str, float]]) -> None:
        """Set the whole blend. A float applies to every part; {"unet": w, "text_encoder": w} sets them apart.
        Adapters not named get weight 0. Negative and > 1 weights are allowed."""
        per_part: dict[str, dict[str, float]] = {p: {} for p in self.models}
        for name, w in weights.items():
            self._check_name(name)
            for part in self.models:
                per_part[part][name] = self._part_weight(name, w, part)
        for part, blend in self.blends.items():
            blend.weights = {n: w for n, w in per_part[part].items() if n in self._names_on(part)}
            blend.bump()
        self._refold_if_merged()

    def get_weights(self) -> dict[str, dict[str, float]]:
        return {n: {p: b.weights.get(n, 0.0) for p, b in self.blends.items() if n in self._names_on(p)}
                for n in self.adapters}

    def _part_weight(self, name: str, w, part: str) -> float:
        if isinstance(w, dict):
            unknown = set(w) - {"unet", "text_encoder"}
            if unknown:
                raise ValueError(f"adapter {name!r}: unknown part(s) {sorted(unknown)}; use 'unet' and 'text_encoder'")
            return _finite(w.get("unet" if part == "unet" else "text_encoder", 0.0), f"adapter {name!r}")
        return _finite(w, f"adapter {name!r}")

    def _check_name(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(f"no adapter named {name!r}; loaded: {', '.join(self.adapters) or 'none'}")

    def _names_on(self, part: str) -> set[str]:
        return {n for layer in self.layers[part].values() for n in layer.names}

    def route(self, samples: list | None) -> contextlib.AbstractContextManager:
        """Per-sample adapters for the coming batches: one entry per image, each None (base), an adapter name (at
        its current weight) or a {name: weight} dict, where a weight may be {"unet": w, "text_encoder": w}.
        route(None) clears it; `with lora.route([...]):` clears on exit."""
        if self.merged and samples is not None:
            raise RuntimeError("per-sample routing needs unmerged weights: call unmerge() first")
        for part, blend in self.blends.items():
            blend.route = None if samples is None else [self._route_entry(s, blend, part) for s in samples]
            blend.bump()
        return _Clear(self)

    def _route_entry(self, sample, blend: Blend, part: str) -> dict[str, float]:
        if sample is None:
            return {}
        if isinstance(sample, str):
            self._check_name(sample)
            return {sample: blend.weights.get(sample, 0.0)}
        if isinstance(sample, dict):
            for n in sample:
                self._check_name(n)
            return {n: self._part_weight(n, w, part) for n, w in sample.items()}
        raise TypeError(f"route entries are None, an adapter name or a {{name: weight}} dict, not {sample!r}")

    @contextlib.contextmanager
    def scaled(self, factor: float):
        """Scale the whole blend for the calls inside the block. Derived at use time, so nothing stays behind."""
        factor = _finite(factor, "scaled")
        old = {p: b.scale for p, b in self.blends.items()}
        for b in self.blends.values():
            b.scale = factor
            b.bump()
        self._refold_if_merged()
        try:
            yield self
        finally:
            for p, b in self.blends.items():
                b.scale = old[p]
                b.bump()
            self._refold_if_merged()

    # ---- folding ------------------------------------------------------------------------------------------------
    def merge(self) -> None:
        """Fold the current blend into the weights and keep it there (zero overhead) until unmerge()."""
        if any(b.route is not None for b in self.blends.values()):
            raise RuntimeError("clear the per-sample route (route(None)) before merging")
        self.merged = True
        self._refold_if_merged()

    def unmerge(self) -> None:
        """Restore the original weights bit for bit."""
        self.merged = False
        for layers in self.layers.values():
            for layer in layers.values():
                layer.unfold()
        self._synced.clear()

    def _refold_if_merged(self) -> None:
        if self.merged:
            for part in self.models:
                self._sync(part)

    def _make_hook(self, part: str):
        def hook(module, args):
            self._sync(part)
        return hook

    def _sync(self, part: str) -> None:
        """Before a model runs: fold the blend in (auto mode, merged) or make sure the weights are original (live)."""
        blend = self.blends[part]
        layers = self.layers[part].values()
        fold = self.merged or (self.mode == "auto" and blend.route is None
                               and not any(p.requires_grad for layer in layers for p in layer.down.values()))
        state = (blend.version, fold)
        if self._synced.get(part) == state:
            return
        with torch.no_grad():
            for layer in layers:
                layer.fold() if fold else layer.unfold()
        self._synced[part] = state

    def copy_bytes(self) -> int:
        """Memory the saved original weights take beyond the model's own (on the CPU; none while unfolded there)."""
        return sum(layer.extra_bytes() for layers in self.layers.values() for layer in layers.values())

    # ---- removal and export -------------------------------------------------------------------------------------
    def remove(self, name: str) -> None:
        self._check_name(name)
        for part, layers in self.layers.items():
            for path, layer in list(layers.items()):
                if name in layer.names:
                    layer.remove(name)
                    if not layer.names:
                        self._unwrap(part, path)
            self.blends[part].weights.pop(name, None)
            self.blends[part].bump()
        del self.adapters[name]
        self._refold_if_merged()

    def _unwrap(self, part: str, path: str) -> None:
        layer = self.layers[part].pop(path)
        layer.unfold()
        parent_path, _, child = path.rpartition(".")
        parent = self.models[part].get_submodule(parent_path) if parent_path else self.models[part]
        setattr(parent, child, layer.base)

    def detach(self) -> None:
        """Remove every adapter and hook: the pipeline is exactly as before attach."""
        for part in self.models:
            for path in list(self.layers[part]):
                self._unwrap(part, path)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.adapters.clear()
        self.merged = False

    def export(self, name: str) -> AdapterWeights:
        """A copy of adapter `name` as AdapterWeights (fp32, CPU), named canonically."""
        self._check_name(name)
        modules = {}
        for part, layers in self.layers.items():
            for path, layer in layers.items():
                if name in layer.names:
                    modules[f"{part}.{strip_text_model(path)}"] = LoRAModule(
                        layer.down[name].detach().float().cpu().clone(), layer.up[name].detach().float().cpu().clone(),
                        layer.alpha[name])
        info = self.adapters[name]
        return AdapterWeights(modules, dict(info.metadata), family=model_family(self.models["unet"]),
                              format="kohya", source=info.source)

    def save(self, name: str, path: str | os.PathLike, format: str = "kohya", dtype: torch.dtype = torch.float16,
             metadata: dict[str, str] | None = None) -> Path:
        return save_adapter(self.export(name), path, format=format, dtype=dtype, metadata=metadata)


class _Clear:
    """Returned by route(): a no-op unless used as a context manager, which clears the route on exit."""

    def __init__(self, owner: Adapters):
        self.owner = owner

    def __enter__(self):
        return self.owner

    def __exit__(self, *exc):
        self.owner.route(None)


def _finite(w, what: str) -> float:
    """A user weight as a float; NaN or Inf would silently turn every image into NaN (black), so they are refused."""
    value = float(w)
    if not math.isfinite(value):
        raise ValueError(f"{what}: the weight must be a finite number, not {w!r}")
    return value


_FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "SDXL", "unknown": "unknown"}


def attach(pipe, mode: str = "auto") -> Adapters:
    """Attach an Adapters controller to a diffusers Stable Diffusion pipeline."""
    existing = getattr(pipe, "_sd_lora", None)
    if existing is not None and existing._hooks:
        raise RuntimeError("this pipeline already has sd_lora attached; use that controller or detach() it first")
    lora = Adapters(pipe, mode=mode)
    pipe._sd_lora = lora
    return lora
