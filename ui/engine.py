"""The app's engine: one pipeline, its sd_lora controller, the adapter library, and each action the UI offers.

Every action applies its own blend under one lock, right before it runs the pipeline, so two users (or the UI and a
script) never get each other's weights in their images. Adapters are loaded once, when found; a new blend is only a
`set_weights` call, so moving a slider and generating again reloads nothing. All LoRA work is sd_lora's.
"""

from __future__ import annotations

import json
import math
import random
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

import sd_lora
from sd_lora import grid
from sd_lora.formats.detect import model_family
from ui import catalog, exports, params

Weights = params.Weights
Progress = Callable[[float, str], None]

LIMITS = {"steps": (1, 150), "guidance": (0.0, 30.0), "size": (64, 2048), "count": (1, 16), "seed": (0, 2**32 - 1)}
SWEEP_STEPS = 5
SEED_AXIS = "seed"  # the sweep's Y value that steps the seed; an adapter named "seed" is picked as "<lora:seed>"


@dataclass
class Settings:
    """One generation request. seed -1 means a random seed; width/height 0 mean the model's native size."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    guidance: float = 7.5
    seed: int = -1
    width: int = 0
    height: int = 0
    count: int = 1


@dataclass
class Result:
    """What an action made: image files with captions, and notes for the user (clamped values, ignored tags)."""

    images: list[tuple[str, str]]
    notes: list[str]
    parameters: str = ""


class Studio:
    def __init__(self, model: str = "tiny", adapter_dirs: list[str | Path] = (), outputs: str | Path = "outputs",
                 device: str | None = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float16 if self.device.startswith("cuda") else None
        self.model_name = str(model)
        self.pipe = sd_lora.load_pipeline(model, device=self.device, dtype=dtype)
        self.lora = sd_lora.attach(self.pipe)
        self.family = model_family(self.pipe.unet)
        self.native_size = int(self.pipe.unet.config.sample_size) * int(self.pipe.vae_scale_factor)
        self.adapter_dirs = [Path(d).resolve() for d in adapter_dirs]
        self.outputs = Path(outputs).resolve()
        self.lock = threading.Lock()  # the pipeline and its blend: held while a request sets weights and runs
        self.library_lock = threading.RLock()  # adding adapters: names and files stay unique
        self.files_lock = threading.Lock()  # picking a free output name and writing it, so two never share one
        self.entries: dict[str, catalog.Entry] = {}
        catalog.remove_stale_uploads(self.adapter_dirs)  # left by an app killed mid-upload; scans never list them
        self.rescan()

    # ---- the library ------------------------------------------------------------------------------------------
    def rescan(self) -> list[catalog.Entry]:
        """Load the files in the adapter folders that are not loaded yet. Usable ones are listed first."""
        with self.library_lock:  # two rescans at once (or a rescan and an upload) must not add a file twice
            known = {e.path for e in self.entries.values()}
            added = [self.add(p) for p in catalog.scan(self.adapter_dirs) if p.resolve() not in known]
            if len(added) == len(self.entries):  # the first scan: usable adapters on top
                self.entries = dict(sorted(self.entries.items(), key=lambda kv: not kv[1].usable))
        return added

    def add(self, path: Path) -> catalog.Entry:
        """Describe and load one adapter file; a file already in the library is not added again."""
        path = path.resolve()
        with self.library_lock:
            entry = next((e for e in self.entries.values() if e.path == path), None)
            if entry is not None:
                return entry
            name = catalog.unique_name(path.stem, set(self.entries))
            entry, weights = catalog.describe(path, name, self.family)
            with self.lock:
                if entry.usable:
                    try:
                        self.lora.load(weights, name=name)
                    except sd_lora.AdapterError as e:
                        entry.error = str(e).replace(str(entry.path), entry.path.name)
                self.entries = {**self.entries, name: entry}  # a new dict: requests reading the old one keep it
        return entry

    def usable(self) -> list[str]:
        return [n for n, e in self.entries.items() if e.usable]

    def describe(self) -> dict:
        """The /adapters answer: the model and every adapter with its metadata."""
        return {"model": self.model_name, "family": self.family, "device": self.device,
                "adapters": [e.as_dict() for e in self.entries.values()]}

    # ---- input checking ---------------------------------------------------------------------------------------
    def parse_weights(self, text: str | dict | None) -> Weights:
        """weights_json -> {name: {"unet": w, "text_encoder": w}}. Adapters not named are off."""
        if isinstance(text, dict):
            data = text
        else:
            try:
                data = json.loads(text) if text and text.strip() else {}
            except json.JSONDecodeError as e:
                raise ValueError(f"weights_json is not valid JSON ({e}); write it like "
                                 '{"mozart": 0.8, "ink": {"unet": 0.5, "text_encoder": 0.2}}') from None
        if not isinstance(data, dict):
            raise TypeError('weights_json must be a JSON object like {"mozart": 0.8}')
        return {name: self._one_weight(name, w) for name, w in data.items()}

    def _one_weight(self, name: str, w) -> dict[str, float]:
        entry = self.entries.get(name)
        if entry is None:
            raise ValueError(f"no adapter named {name!r}; available: {', '.join(self.usable()) or 'none'}")
        if not entry.usable:
            raise ValueError(f"adapter {name!r} is disabled: {entry.error}")
        parts = w if isinstance(w, dict) else {"unet": w, "text_encoder": w}
        unknown = set(parts) - {"unet", "text_encoder"}
        if unknown:
            raise ValueError(f"adapter {name!r}: unknown part(s) {sorted(unknown)}; use 'unet' and 'text_encoder'")
        out = {}
        for part in ("unet", "text_encoder"):
            value = parts.get(part, 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"adapter {name!r}: the {part} weight must be a finite number, not {value!r}")
            out[part] = float(value)
        return out

    def clamp(self, s: Settings) -> tuple[Settings, list[str]]:
        """Bring every setting into range; each change is reported, never silent."""
        notes: list[str] = []

        def fit(label, value, lo, hi, cast):
            v = _number(label, value)
            v = cast(v) if math.isfinite(v) else v  # an infinite value is clamped like any other
            if v < lo or v > hi:
                new = cast(min(max(v, lo), hi))
                notes.append(f"{label} {v:g} is out of range ({lo:g}–{hi:g}); using {new:g}")
                return new
            return v

        steps = fit("steps", s.steps, *LIMITS["steps"], int)
        guidance = fit("CFG scale", s.guidance, *LIMITS["guidance"], float)
        count = fit("batch count", s.count, *LIMITS["count"], int)
        sizes = []
        for label, value in (("width", s.width), ("height", s.height)):
            v = fit(label, _whole(label, value) or self.native_size, *LIMITS["size"], int)
            if v % 8:
                notes.append(f"{label} {v} is not a multiple of 8; using {v - v % 8}")
                v -= v % 8
            sizes.append(v)
        seed = _whole("seed", s.seed) if s.seed is not None else -1
        if seed < 0:
            seed = random.randint(0, 2**31 - 1)
        else:
            seed = fit("seed", seed, *LIMITS["seed"], int)
        return replace(s, steps=steps, guidance=guidance, count=count, width=sizes[0], height=sizes[1],
                       seed=seed), notes

    def _prompt_tags(self, prompt: str, weights: Weights, notes: list[str]) -> tuple[str, Weights]:
        """A1111 users type `<lora:name:0.8>` into the prompt: apply those tags, and never feed them to CLIP."""
        clean, tagged = params.extract_tags(prompt)
        weights = dict(weights)
        for name, w in tagged.items():
            if name in self.entries and self.entries[name].usable:
                weights[name] = w
            else:
                notes.append(f"<lora:{name}> in the prompt matches no usable adapter; ignored")
        return clean, weights

    # ---- running the pipeline -----------------------------------------------------------------------------------
    def _run(self, prompt: str, s: Settings, seeds: list[int], progress: Progress | None, desc: str,
             done: int = 0, total: int | None = None) -> list[Image.Image]:
        """One batched pipeline call: one image per seed. Call with the lock held and the blend set."""
        total = total or s.steps

        def on_step(pipe, i, t, kwargs):
            if progress is not None:
                progress(min(1.0, (done + i + 1) / total), desc)
            return kwargs

        n = len(seeds)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        out = self.pipe(prompt=[prompt] * n, negative_prompt=[s.negative_prompt] * n if s.negative_prompt else None,
                        num_inference_steps=s.steps, guidance_scale=s.guidance, width=s.width, height=s.height,
                        generator=generators if n > 1 else generators[0], callback_on_step_end=on_step)
        return out.images

    def _infotext(self, prompt: str, s: Settings, seed: int, weights: Weights, extra: dict | None = None) -> str:
        active = {n: w for n, w in weights.items() if w["unet"] or w["text_encoder"]}
        hashes = ", ".join(f"{n}: {self.entries[n].short_hash}" for n in active if self.entries[n].short_hash)
        settings = {"Steps": s.steps, "Sampler": type(self.pipe.scheduler).__name__.removesuffix("Scheduler"),
                    "CFG scale": params.number(s.guidance), "Seed": seed, "Size": f"{s.width}x{s.height}",
                    "Model": Path(self.model_name).stem if self.model_name != "tiny" else "tiny",
                    "Lora hashes": hashes, **(extra or {}), "Version": f"sd-lora {sd_lora.__version__}"}
        return params.infotext(prompt, s.negative_prompt, active, settings)

    def _save(self, image: Image.Image, kind: str, text: str, record: dict) -> str:
        day = time.strftime("%Y-%m-%d")
        path = self.outputs / kind / day / f"{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:6]}.png"
        return str(params.save_png(image, path, text, record))

    def _record(self, prompt: str, s: Settings, seed: int, weights: Weights) -> dict:
        return {"prompt": prompt, "negative_prompt": s.negative_prompt, "weights": weights, "steps": s.steps,
                "guidance": s.guidance, "seed": seed, "width": s.width, "height": s.height, "model": self.model_name}

    # ---- actions ------------------------------------------------------------------------------------------------
    def generate(self, s: Settings, weights: Weights, progress: Progress | None = None) -> Result:
        """`count` images with seeds seed, seed+1, ...; each one a separate call, so each seed reproduces alone."""
        s, notes = self.clamp(s)
        prompt, weights = self._prompt_tags(s.prompt, weights, notes)
        images, text = [], ""
        with self.lock:
            self.lora.set_weights(weights)
            for i in range(s.count):
                seed = s.seed + i
                image = self._run(prompt, s, [seed], progress, f"image {i + 1} of {s.count}",
                                  done=i * s.steps, total=s.count * s.steps)[0]
                text = self._infotext(prompt, s, seed, weights)
                images.append((self._save(image, "images", text, self._record(prompt, s, seed, weights)),
                               f"seed {seed}"))
        return Result(images, notes, text)

    @staticmethod
    def _weight_label(w: dict[str, float]) -> str:
        """"0.8", or "0.8 / te 0.3" when the text encoder's weight differs from the UNet's."""
        if w["unet"] == w["text_encoder"]:
            return params.number(w["unet"])
        return f"{params.number(w['unet'])} / te {params.number(w['text_encoder'])}"

    def compare(self, s: Settings, weights: Weights, progress: Progress | None = None) -> Result:
        """The base and each enabled adapter alone (and their blend), same prompt and seed, in one batched pass."""
        s, notes = self.clamp(replace(s, count=1))
        prompt, weights = self._prompt_tags(s.prompt, weights, notes)
        active = {n: w for n, w in weights.items() if w["unet"] or w["text_encoder"]}
        if not active:
            raise ValueError("enable at least one adapter to compare it with the base model")
        samples: list[tuple[str, Weights]] = [("base model", {})]
        samples += [(f"{n} {self._weight_label(w)}", {n: dict(w)}) for n, w in active.items()]
        if len(active) > 1:
            samples.append(("blend", {n: dict(w) for n, w in active.items()}))
        with self.lock:
            self.lora.set_weights(weights)
            with self.lora.route([route or None for _, route in samples]):
                tiles = self._run(prompt, s, [s.seed] * len(samples), progress, f"{len(samples)} images, one pass")
        files = []
        for (label, route), image in zip(samples, tiles):
            text = self._infotext(prompt, s, s.seed, route)
            files.append((self._save(image, "compare", text, self._record(prompt, s, s.seed, route)), label))
        strip = grid.labelled_grid([tiles], [label for label, _ in samples], title=f"{prompt[:60]} · seed {s.seed}")
        text = self._infotext(prompt, s, s.seed, active, {"Compare": ", ".join(label for label, _ in samples)})
        files.insert(0, (self._save(strip, "compare", text, {"compare": [lbl for lbl, _ in samples]}),
                         "side by side"))
        return Result(files, notes, text)

    def sweep(self, s: Settings, weights: Weights, x_name: str, x_range: tuple[float, float], y_axis: str,
              y_range: tuple[float, float] = (0.0, 1.0), y_steps: int = 3, progress: Progress | None = None) -> Result:
        """A labelled grid: X is one adapter's weight in 5 steps; Y is another adapter's weight, or the seed."""
        s, notes = self.clamp(replace(s, count=1))
        prompt, weights = self._prompt_tags(s.prompt, weights, notes)
        seeds = y_axis == SEED_AXIS
        x_name, y_name = axis_adapter(x_name), None if seeds else axis_adapter(y_axis)
        for name in (x_name, y_name):
            if name is not None and name not in self.usable():
                raise ValueError(f"no usable adapter named {name!r} to sweep; available: {', '.join(self.usable())}")
        if x_name == y_name:
            raise ValueError("pick a different adapter (or the seed) for Y than for X")
        if not all(math.isfinite(float(v)) for v in (*x_range, *y_range)):
            raise ValueError(f"the sweep's weight ranges must be finite numbers, got X {x_range}, Y {y_range}")
        y_steps = int(min(max(int(y_steps), 1), SWEEP_STEPS))
        xs = _steps(*x_range, SWEEP_STEPS)
        ys = [s.seed + j for j in range(y_steps)] if seeds else _steps(*y_range, y_steps)
        base = {n: dict(w) for n, w in weights.items()}  # the other adapters keep their per-part weights
        rows = []
        with self.lock:
            self.lora.set_weights(weights)
            for j, y in enumerate(ys):
                route = [{**base, x_name: x} if seeds else {**base, x_name: x, y_name: y} for x in xs]
                seed = int(y) if seeds else s.seed
                with self.lora.route(route):
                    rows.append(self._run(prompt, s, [seed] * len(xs), progress, f"row {j + 1} of {len(ys)}",
                                          done=j * s.steps, total=len(ys) * s.steps))
        col_labels = [f"{x_name} {params.number(x)}" for x in xs]
        row_labels = [f"seed {y}" if seeds else f"{y_name} {params.number(y)}" for y in ys]
        image = grid.labelled_grid(rows, col_labels, row_labels, title=prompt[:80])
        extra = {"X": f"<lora:{x_name}> " + ", ".join(params.number(x) for x in xs),
                 "Y": ("Seed " if seeds else f"<lora:{y_name}> ") + ", ".join(params.number(y) for y in ys)}
        text = self._infotext(prompt, s, s.seed, weights, extra)
        y_record = SEED_AXIS if seeds else axis_choice(y_name)  # what /sweep takes to make this grid again
        path = self._save(image, "grids", text, {"sweep": {"x": [x_name, xs], "y": [y_record, ys]},
                                                 **self._record(prompt, s, s.seed, weights)})
        return Result([(path, "weight sweep")], notes, text)

    # ---- merge & export (ui/exports.py writes the files) --------------------------------------------------------
    def _items(self, weights: Weights) -> exports.Items:
        active = {n: w for n, w in weights.items() if w["unet"] or w["text_encoder"]}
        if not active:
            raise ValueError("the blend is empty: enable at least one adapter with a non-zero weight")
        with self.lock:
            return [(self.lora.export(n), w) for n, w in active.items()]

    def export_blend(self, weights: Weights, name: str, rank: int | None = None, card: dict[str, str] | None = None,
                     thumbnail: str | None = None) -> Result:
        """One kohya LoRA file equal to the blend: exact (ranks concatenated) when `rank` is None, else SVD to `rank`.
        `card` holds title, author, trigger, license and description for the modelspec metadata; `thumbnail` is an
        image file (the app passes the last generated image)."""
        path, notes = exports.write_lora(self._items(weights), weights, dict(self.pipe.unet.config),
                                         self.outputs / "loras", name, self.family, self.files_lock,
                                         rank=rank, card=card, thumbnail=thumbnail)
        return Result([(str(path), path.name)], notes)

    def merge_checkpoint(self, weights: Weights, single_file: bool = True) -> Result:
        """The base model with the blend folded in: an original-SD single .safetensors file (what A1111 and ComfyUI
        load), or a diffusers folder offered as a .zip."""
        path, notes = exports.write_checkpoint(self._items(weights), self.model_name, self.outputs / "checkpoints",
                                               self.files_lock, single_file)
        return Result([(str(path), path.name)], notes)


def _number(label: str, value) -> float:
    """A setting as a float, or a ValueError naming it: NaN passes every range test, so it is refused here."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if math.isnan(number):
        raise ValueError(f"{label} must be a number, not {value!r}")
    return number


def _whole(label: str, value) -> float:
    """`_number` truncated to a whole number, as int() does; an infinite value stays as it is, to be clamped."""
    number = _number(label, value)
    return float(int(number)) if math.isfinite(number) else number


def axis_choice(name: str) -> str:
    """How adapter `name` is picked as the sweep's Y axis: its name, or A1111's tag `<lora:name>` when the name
    is the seed axis's own value (no adapter name can hold '<' or ':')."""
    return f"<lora:{name}>" if name == SEED_AXIS else name


def axis_adapter(value: str) -> str:
    """An adapter named on a sweep axis: `name`, or `<lora:name>`."""
    tag = re.fullmatch(r"<lora:([^:<>]+)>", value.strip()) if isinstance(value, str) else None
    return tag[1] if tag else value


def _steps(lo: float, hi: float, n: int) -> list[float]:
    if n == 1:
        return [float(lo)]
    return [round(lo + (hi - lo) * i / (n - 1), 4) for i in range(n)]
