"""What a training run tells people: the start and end screens, the loss plot, sample grids, and the metadata and
sidecar files that travel with the adapter (what A1111, ComfyUI and model sites read).

Plain functions of plain values; nothing here touches a model. The loss plot is drawn with Pillow, so it needs no
plotting library.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from sd_lora.training.config import TrainConfig, valid_text

# ---------------------------------------------------------------------------------------------------------------
# Screens


def screen(title: str, rows: Sequence[tuple[str, str]]) -> str:
    """A titled block of aligned 'label  value' rows."""
    width = max((len(label) for label, _ in rows), default=0)
    text = "\n".join([title, *(f"  {label.ljust(width)}  {value}" for label, value in rows)])
    return valid_text(text)  # paths may hold bytes that are not UTF-8: printing them would raise


COMPILE_NOTE = "; torch.compile: the first step of each bucket compiles"


def start_rows(cfg: TrainConfig, *, images: int, buckets: dict, sidecars: int, class_images: int, steps: int,
               start_step: int, epochs: float, processes: int, images_per_step: float, modules: dict[str, int],
               trainable: int, precision: str, device: str, frozen_bytes: int, caching: str,
               resume: str | None) -> list:
    buckets_text = ", ".join(f"{w}x{h} ×{n}" for (w, h), n in buckets.items())
    per_step = (count(round(images_per_step), "image") if images_per_step == round(images_per_step) else
                f"{images_per_step:.3g} images on average")  # a bucket's last batch may hold fewer
    te = f" + {modules['text_encoder']} text-encoder" if modules.get("text_encoder") else ""
    te_lr = f" / {cfg.te_lr:g} text encoder" if modules.get("text_encoder") else ""
    rows = [
        ("model", f"{cfg.model}  ({device}, {precision}{COMPILE_NOTE if cfg.compile else ''})"),
        ("images", (f"{images} in {cfg.images}; {count(len(buckets), 'bucket')}: "
                   f"{buckets_text}")),
        ("captions", (f"{sidecars} from sidecar files, {images - sidecars} from the prompt {cfg.prompt!r}; "
                     f"token {cfg.token!r}")),
        ("prior", f"{class_images} class images of {cfg.class_prompt!r} in {cfg.class_images}, weight "
                  f"{cfg.prior_weight:g}" if cfg.prior_preservation else "off"),
        ("network", (f"LoRA rank {cfg.rank}, alpha {cfg.alpha:g}, {cfg.targets}: {modules.get('unet', 0)} UNet{te} "
                    f"modules, {trainable:,} trainable parameters (fp32)")),
        ("steps", (f"{steps} × {per_step} (batch {cfg.batch_size} × grad-accum {cfg.grad_accum} × "
                  f"{count(processes, 'process', 'processes')}) = {epochs:.3g} epoch{'' if epochs == 1 else 's'}")),
        ("optimizer", (f"{cfg.optimizer}, lr {cfg.lr:g} UNet{te_lr}, {cfg.lr_scheduler} "
                      f"after {cfg.warmup_steps} warmup steps, max-grad-norm {cfg.max_grad_norm:g}")),
        ("loss", ", ".join(filter(None, [f"min-SNR γ {cfg.min_snr_gamma:g}" if cfg.min_snr_gamma else "",
                                         f"noise offset {cfg.noise_offset:g}" if cfg.noise_offset else "",
                                         f"seed {cfg.seed}"]))),
        ("memory", (f"frozen weights {_size(frozen_bytes)}, LoRA + gradients + AdamW state "
                   f"{_size(trainable * 4 * 4)}{', gradient checkpointing' if cfg.gradient_checkpointing else ''}")),
        ("caching", caching),
        ("output", (f"{Path(cfg.output) / cfg.name}.safetensors; samples every {cfg.sample_every or '-'} steps, "
                   f"checkpoints every {cfg.save_every or '-'} (keep {cfg.keep_checkpoints})")),
    ]
    if resume:
        rows.append(("resume", f"from {resume} (step {start_step})"))
    return rows


def end_rows(*, seconds: float, step_seconds: float, trained_steps: int, images_per_step: float,
             losses: Sequence[float], skipped: int, adapter: Path, extra_files: Sequence[Path],
             peak_memory: str) -> list:
    rate = trained_steps / step_seconds if step_seconds > 0 else 0.0
    tail = [x for x in losses[-20:] if math.isfinite(x)]
    rows = [
        ("time", (f"{_duration(seconds)} in all; {count(trained_steps, 'step')} took {_duration(step_seconds)} "
                  f"({rate:.2f} steps/s, {rate * images_per_step:.2f} images/s)")),
        ("loss", f"{sum(tail) / len(tail):.4f} (mean of the last {count(len(tail), 'step')})" if tail else "-"),
        ("skipped", f"{count(skipped, 'step')} with a NaN/Inf loss" if skipped else "none"),
        ("memory", f"peak {peak_memory}"),
        ("adapter", f"{adapter} ({_size(adapter.stat().st_size) if adapter.exists() else '?'})"),
    ]
    rows += [("", str(p)) for p in extra_files]
    return rows


def count(n: int, noun: str, plural: str | None = None) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {plural or noun + 's'}"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


# ---------------------------------------------------------------------------------------------------------------
# Pictures


def grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    """Images side by side (in rows of `columns`), on white."""
    columns = columns or len(images)
    w, h = images[0].size
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (w * columns, h * rows), "white")
    for i, image in enumerate(images):
        sheet.paste(image.convert("RGB"), ((i % columns) * w, (i // columns) * h))
    return sheet


def loss_plot(losses: Sequence[float], title: str = "loss", size: tuple[int, int] = (800, 400)) -> Image.Image:
    """Per-step loss (light) and its running mean (dark) against the step, with the axes labelled."""
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 70, width - 20, 30, height - 40
    draw.text((left, 8), title, fill="black")
    points = [(i + 1, v) for i, v in enumerate(losses) if math.isfinite(v)]
    draw.rectangle((left, top, right, bottom), outline="black")
    if not points:
        draw.text((left + 10, top + 10), "no finite loss yet", fill="black")
        return image
    low, high = min(v for _, v in points), max(v for _, v in points)
    high = high if high > low else low + 1.0
    last = max(len(losses), 2)

    def xy(step: float, value: float) -> tuple[float, float]:
        return (left + (step - 1) / (last - 1) * (right - left),
                bottom - (value - low) / (high - low) * (bottom - top))

    for k in range(5):  # gridlines and labels
        value = low + (high - low) * k / 4
        y = xy(1, value)[1]
        draw.line((left, y, right, y), fill=(225, 225, 225))
        draw.text((6, y - 6), f"{value:.4g}", fill="black")
    draw.text((left, bottom + 8), "step 1", fill="black")
    draw.text((right - 70, bottom + 8), f"step {len(losses)}", fill="black")
    if len(points) > 1:
        draw.line([xy(s, v) for s, v in points], fill=(160, 190, 230), width=1)
        draw.line([xy(s, v) for s, v in zip([s for s, _ in points], running_mean([v for _, v in points]))],
                  fill=(20, 60, 160), width=2)
    else:
        x, y = xy(*points[0])
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(20, 60, 160))
    return image


def running_mean(values: Sequence[float], window: int | None = None) -> list[float]:
    window = window or max(1, len(values) // 20)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


# ---------------------------------------------------------------------------------------------------------------
# What travels with the adapter


# diffusers' scheduler prediction_type -> ModelSpec's modelspec.prediction_type (kohya's sai_model_spec.py values)
PREDICTION_TYPES = {"epsilon": "epsilon", "v_prediction": "v"}


def adapter_metadata(cfg: TrainConfig, *, resolution: int, images: int, class_images: int, steps: int,
                     epochs: float, precision: str, started: float, finished: float, processes: int,
                     tag_frequency: dict | None, prediction_type: str | None = None,
                     bucket_info: dict | None = None) -> dict[str, str]:
    """kohya-style training settings (ss_*) and ModelSpec fields; save_adapter adds the base-model keys.
    `prediction_type`: the base model's scheduler's (diffusers' "epsilon" or "v_prediction"); save_adapter needs it
    to tell SD2.x-base from SD2.x-768-v."""
    md = {
        "ss_sd_model_name": model_name(cfg.model), "ss_output_name": cfg.name, "ss_network_args": json.dumps(
            {"targets": cfg.targets, "text_encoder": cfg.text_encoder, "trainer": "sd-lora"}),
        "ss_learning_rate": cfg.lr, "ss_unet_lr": cfg.lr, "ss_text_encoder_lr": cfg.te_lr if cfg.text_encoder else 0,
        "ss_optimizer": {"adamw": "torch.optim.AdamW", "adamw8bit": "bitsandbytes.optim.AdamW8bit"}[cfg.optimizer],
        "ss_lr_scheduler": cfg.lr_scheduler, "ss_lr_warmup_steps": cfg.warmup_steps, "ss_max_train_steps": steps,
        "ss_num_epochs": math.ceil(epochs), "ss_num_train_images": images, "ss_num_reg_images": class_images,
        "ss_batch_size_per_device": cfg.batch_size, "ss_gradient_accumulation_steps": cfg.grad_accum,
        "ss_total_batch_size": cfg.batch_size * cfg.grad_accum * processes,
        "ss_resolution": f"({resolution}, {resolution})", "ss_mixed_precision": precision, "ss_seed": cfg.seed,
        "ss_max_grad_norm": cfg.max_grad_norm, "ss_noise_offset": cfg.noise_offset,
        "ss_min_snr_gamma": cfg.min_snr_gamma or 0, "ss_prior_loss_weight": cfg.prior_weight,
        "ss_flip_aug": cfg.flip, "ss_cache_latents": cfg.cache, "ss_gradient_checkpointing":
            cfg.gradient_checkpointing, "ss_training_started_at": int(started),
        "ss_training_finished_at": int(finished),
        "modelspec.title": cfg.name, "modelspec.trigger_phrase": cfg.token,
        "modelspec.resolution": f"{resolution}x{resolution}",
        # ISO 8601 with its offset: without one, readers (JavaScript's Date, fromisoformat) take it as local time
        "modelspec.date": _dt.datetime.fromtimestamp(int(finished), _dt.timezone.utc).isoformat(),
        "modelspec.description": f"Style LoRA for {cfg.token!r}, trained with sd-lora",
    }
    if prediction_type in PREDICTION_TYPES:
        md["modelspec.prediction_type"] = PREDICTION_TYPES[prediction_type]
    if bucket_info is not None:  # buckets.bucket_info
        md["ss_bucket_info"] = json.dumps(bucket_info)
    if tag_frequency is not None:
        md["ss_tag_frequency"] = json.dumps(tag_frequency)
        md["ss_dataset_dirs"] = json.dumps({Path(cfg.images).name: {"n_repeats": 1, "img_count": images}})
    return {k: str(v) for k, v in md.items()}


def model_name(model: str) -> str:
    """ss_sd_model_name as kohya writes it: a hub id or "tiny" as given, a local file or folder by its name only (its
    full path would show in A1111's card and tell everyone the trainer's folders), as valid UTF-8 (safetensors
    cannot store the surrogates a path with bytes that are not UTF-8 holds)."""
    path = os.path.abspath(os.path.expanduser(model))  # "." and "../sd15" name a folder; links keep their name
    return valid_text(os.path.basename(path) if os.path.exists(path) else model)


def sidecar(cfg: TrainConfig, family: str) -> dict:
    """<name>.json, the card A1111 shows next to the adapter."""
    version = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}.get(family, "Unknown")
    return {"description": f"Style LoRA for {cfg.token!r}, trained with sd-lora.", "sd version": version,
            "activation text": cfg.token, "preferred weight": 1.0, "notes": f"rank {cfg.rank}, {cfg.targets}"}


def loggable(value):
    """A run setting as trackers take it: numbers and booleans as they are, anything else as valid UTF-8 text (a
    folder name with bytes that are not UTF-8 holds surrogates, which TensorBoard's writer cannot encode)."""
    return value if isinstance(value, (int, float, bool)) else valid_text(str(value))
