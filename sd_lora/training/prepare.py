"""What a training run needs before its first step, kept out of the loop so the loop reads as the recipe: flags
that ask for missing packages or a missing GPU, the Accelerator (device and precision), the base model, its native
resolution (and sizes that make no sense for the model), the prior-preservation class images, the optimizer and its
learning-rate schedule. Plus two small output helpers (progress bars, PNG files).
"""

from __future__ import annotations

import importlib.util
import io
import math
import os
import sys
import warnings
from pathlib import Path

import torch

from sd_lora.training.buckets import assign_buckets
from sd_lora.training.class_images import generate_class_images, usable_class_images
from sd_lora.training.config import TrainConfig, UsageError, say

WEIGHT_DECAY = 1e-2  # AdamW's, as diffusers' LoRA scripts use
# From twice its native size up (1024 px for SD1.5), a model trains on images it never learned to make, and a step
# costs at least 4x the memory and time.
FAR_ABOVE_NATIVE = 2


def _cuda() -> bool:
    forced_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return torch.cuda.is_available() and not forced_cpu


def check_extras(cfg: TrainConfig) -> None:
    """Optional packages and CUDA-only features a flag asks for: one clear error before anything loads."""
    if cfg.optimizer == "adamw8bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UsageError("--optimizer adamw8bit needs bitsandbytes: pip install 'sd-lora[bnb]' (CUDA only), "
                             "or use --optimizer adamw")
        if not _cuda():
            raise UsageError("--optimizer adamw8bit needs a CUDA GPU (bitsandbytes' 8-bit AdamW); use --optimizer "
                             "adamw on the CPU")
    if cfg.attention == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise UsageError("--attention xformers: xformers is not installed (pip install 'sd-lora[xformers]', CUDA "
                             "only); the default --attention sdpa needs nothing")
        if not _cuda():
            raise UsageError("--attention xformers needs a CUDA GPU; use --attention sdpa on the CPU")
        problem = xformers_problem()
        if problem:
            raise UsageError(f"--attention xformers: xformers is installed but cannot run here ({problem}); "
                             "reinstall it for this torch and CUDA, or use --attention sdpa")
    if cfg.compile:
        _check_compile()
    if cfg.log_with == "tensorboard" and not _has_tensorboard():
        raise UsageError("--log-with tensorboard: tensorboard is not installed (pip install tensorboard)")


def xformers_problem() -> str | None:
    """Why xformers' attention cannot run on this GPU, or None. The probe is the call diffusers makes when it
    switches xformers on (fp32, tiny), on this process's GPU; a wheel built for another torch or CUDA fails it with
    a page of text."""
    try:
        import xformers.ops

        q = torch.zeros((1, 2, 40), device=torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
        xformers.ops.memory_efficient_attention(q, q, q)
    except Exception as e:  # noqa: BLE001 - whatever the build lacks, say so in one line
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        built = next((line.strip() for line in str(e).splitlines() if "built with" in line or "build with" in line),
                     None)
        return f"{first[:120]}{'; ' + built[:120] if built and built != first else ''}"
    return None


def _check_compile() -> None:
    """--compile runs the step through inductor: triton kernels on a CUDA GPU, C++ on the CPU."""
    if _cuda():
        if importlib.util.find_spec("triton") is None:
            raise UsageError("--compile on a GPU needs triton (it comes with PyTorch's CUDA wheels: pip install "
                             "triton); or drop --compile")
        return
    if not have_cpp_compiler():
        raise UsageError("--compile on the CPU needs a C++ compiler (g++ was not found; e.g. apt install g++); "
                         "or drop --compile")


def have_cpp_compiler() -> bool:
    """Whether inductor finds the C++ compiler its CPU code needs."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception:  # noqa: BLE001 - inductor raises its own InvalidCxxCompiler
        return False
    return True


# Inductor options per device. On the CPU, torch 2.13's inductor fuses some kernels of the LoRA backward wrongly:
# with its default fusion the tiny UNet's mid-block cross-attention LoRA got exactly zero gradients and earlier
# layers gradients 4-18% off, while the loss matched eager (bench/compile_cpu_check.py reproduces it). Capping a
# fused kernel at two nodes gives eager's gradients at the same speed; tests/test_training_compile.py checks them.
CPU_COMPILE_OPTIONS = {"max_fusion_size": 2}


def compile_model(model, device: torch.device):
    """The module compiled for --compile: one graph per input shape (dynamic=False: inductor's dynamic-shape path
    failed on the UNet when the bucket changed, torch 2.13), with the device's inductor options."""
    # With --gradient-checkpointing, dynamo warns that it traces through diffusers' lru_cache'd is_torch_version (a
    # constant): not a risk here, and the compiled gradients match eager (bench/RESULTS.md, train_step).
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`-wrapped function",
                            category=UserWarning)
    return torch.compile(model, dynamic=False, options=dict(CPU_COMPILE_OPTIONS) if device.type == "cpu" else None)


def allow_recompiles(records, class_records) -> None:
    """--compile makes one graph per input shape (see compile_model). A run feeds at most two batch shapes per
    bucket (full batches and the bucket's last, partial one), so dynamo's recompile limit must allow that many, or it
    falls back to eager."""
    import torch._dynamo

    shapes = 2 * (len({r.bucket for r in records}) + len({r.bucket for r in class_records}))
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, shapes)


def checkpoint_activations(unet, text_encoder=None) -> None:
    """--gradient-checkpointing: recompute activations in the backward instead of keeping them, in the UNet and a
    trained text encoder (non-reentrant checkpoints, which need no input that requires grad)."""
    unet.enable_gradient_checkpointing()
    if text_encoder is None:
        return
    enable = getattr(text_encoder, "activation_checkpointing_enable", None)  # transformers 5's name; the old one warns
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers 4
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _has_tensorboard() -> bool:
    return any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))


def make_accelerator(cfg: TrainConfig, notice: bool = True):
    """An Accelerator for the device and the precision: fp16 by default on CUDA, fp32 ('no') on the CPU. With the
    default --mixed-precision auto, a low precision chosen for the launcher (`accelerate launch --mixed_precision
    bf16`, or an accelerate config file) is used as if given to the trainer; the launcher's 'no' is also its default
    when nothing was chosen, so it does not count."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    precision = cfg.mixed_precision
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision == "auto" and launched in ("fp16", "bf16"):
        precision = launched
    if not _cuda() and precision in ("auto", "fp16"):
        if notice:
            print(f"notice: no CUDA GPU, so training runs in fp32 on the CPU (mixed precision "
                  f"{'fp16 needs' if precision == 'fp16' else 'is for'} a GPU)", file=sys.stderr, flush=True)
        precision = "no"
    elif precision == "auto":
        precision = "fp16"
    log_with = cfg.log_with if cfg.log_with != "auto" else "tensorboard" if _has_tensorboard() else "none"
    out = Path(cfg.output)
    return Accelerator(mixed_precision=precision, cpu=not _cuda(), log_with=None if log_with == "none" else log_with,
                       project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))


def weight_dtype(accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def precision_text(accelerator) -> str:
    if accelerator.mixed_precision == "no":
        return "fp32"
    return f"{accelerator.mixed_precision} mixed precision (frozen weights {accelerator.mixed_precision}, LoRA fp32)"


def load_model(model: str):
    """load_pipeline, with a missing model or an unreachable hub as one usage error that suggests --model tiny."""
    import sd_lora

    try:
        return sd_lora.load_pipeline(model)
    except sd_lora.ModelLoadError as e:
        from sd_lora.pipeline import OFFLINE_HINT

        message = " ".join(str(e).split())
        if OFFLINE_HINT in message:
            message = message.replace(OFFLINE_HINT, "offline, use --model tiny (the built-in model), a local diffusers "
                                                    "folder or a .safetensors checkpoint")
        else:
            message += " (--model tiny trains the built-in model offline)"
        raise UsageError(f"--model: {message}") from None


def native_resolution(pipe) -> int:
    """The size the model generates by default: its latent size times the VAE's downscale factor."""
    return pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def warn_sizes(cfg: TrainConfig, pipe, notice: bool = True) -> None:
    """One stderr line for each size that trains but makes no sense for this model: a --resolution far above its
    native size, and a --rank above what the layers it trains can use. `notice`: False on the other processes of
    a multi-process run, so the warnings show once."""
    if not notice:
        return
    native = native_resolution(pipe)
    if cfg.resolution is not None and cfg.resolution >= FAR_ABOVE_NATIVE * native:
        factor = (cfg.resolution / native) ** 2
        say(f"warning: --resolution {cfg.resolution}: the model was trained at {native} px; memory and time per "
            f"step grow with the square of the resolution: {factor:.3g}x the native size's here")
    sides = lora_sides(pipe, cfg.targets, cfg.text_encoder)
    over = {path: side for path, side in sides.items() if cfg.rank > side}
    if over:
        path, side = min(over.items(), key=lambda item: item[1])
        which = f"all {len(sides)}" if len(over) == len(sides) else f"{len(over)} of the {len(sides)}"
        say(f"warning: --rank {cfg.rank} is above what {which} layers it trains can use: a layer's update has a "
            f"rank of at most min(in, out), {side} for {path}; rank beyond that adds parameters but no capacity")


def lora_sides(pipe, preset: str, text_encoder: bool = True) -> dict[str, int]:
    """"part.path" -> min(out, in) of every layer `preset` puts LoRA on: the highest rank its update can have
    (a kxk conv's input counts in x k x k values)."""
    from sd_lora.targets import PARTS, is_target_module, select, strip_text_model

    sides = {}
    for part in PARTS:
        model = getattr(pipe, part, None)
        if model is None or (part != "unet" and not text_encoder):
            continue
        layers = {strip_text_model(name): m for name, m in model.named_modules() if is_target_module(m)}
        for path in select(list(layers), part, preset):
            shape = layers[path].weight.shape
            sides[f"{part}.{path}"] = min(shape[0], math.prod(shape[1:]))
    return sides


def class_images(cfg: TrainConfig, pipe, resolution: int, accelerator) -> list:
    """Prior preservation: top the class folder up to --num-class-images with the base model (main process), then
    the first --num-class-images of them, all captioned with the class prompt, in buckets. What the run reads or
    writes elsewhere (the images, the output and cache folders) is left out of the class folder's scan. That the
    folder is not the output folder, and can be written when images are missing, was checked before the model
    loaded (run_folder.check_apart, check_writable)."""
    folder, main = Path(cfg.class_images).expanduser(), accelerator.is_main_process
    exclude = cfg.not_class_images()
    if main:
        missing = cfg.num_class_images - len(usable_class_images(folder, exclude=exclude))
        if missing > 0:
            with progress_bar(missing, 0, desc="class images") as bar:  # closed on Ctrl-C too: a clean next line
                generate_class_images(folder, cfg.class_prompt, cfg.num_class_images, pipe, resolution,
                                      seed=cfg.seed, progress=lambda done, total: bar.update(1), exclude=exclude)
    accelerator.wait_for_everyone()
    found = usable_class_images(folder, cfg.class_prompt, warn=_class_warning if main else None, exclude=exclude)
    if len(found) < cfg.num_class_images:  # another machine's process, with a folder the main one does not see
        raise UsageError(f"--class-images {cfg.class_images}: this process finds {len(found)} of the "
                         f"{cfg.num_class_images} class images the main process made; put the folder on a file "
                         "system every process of the run can read")
    return assign_buckets(found[:cfg.num_class_images], resolution)


def _class_warning(message: str) -> None:
    """scan_images' warnings about the class folder, told apart from those about the images folder."""
    say(message.replace("warning: ", "warning: class images: ", 1))


def warn_long_captions(tokenizer, captions: list[str]) -> None:
    """One stderr line when captions do not fit the text encoder's window: their ends are cut off in training."""
    from sd_lora.training.caches import truncated_captions

    long = truncated_captions(tokenizer, captions)
    if long:
        print(f"warning: {len(long)} caption(s) are longer than the text encoder's {tokenizer.model_max_length} "
              f"tokens and are cut off in training, e.g. {long[0][:80]!r}...", file=sys.stderr, flush=True)


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB on {torch.cuda.get_device_name(device)}"
    import resource

    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB process memory (CPU)"


def progress_bar(total: int, initial: int, disable: bool = False, desc: str = "training"):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step" if desc == "training" else "image",
                leave=desc == "training",
                disable=disable, dynamic_ncols=True, mininterval=0.5)


def write_png(path: Path, image) -> None:
    from sd_lora.adapter import atomic_write_bytes

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def lr_factor(kind: str, warmup: int, total: int):
    """LambdaLR factor after `step` optimizer steps: linear warmup to 1, then constant, linear or cosine to 0."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[kind]
    return factor


def make_optimizer(kind: str, groups: list[dict]) -> torch.optim.Optimizer:
    if kind == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, weight_decay=WEIGHT_DECAY)
    try:  # one fused kernel instead of a dozen per parameter: 6x faster on many small LoRA matrices
        return torch.optim.AdamW(groups, weight_decay=WEIGHT_DECAY, fused=True)
    except (RuntimeError, ValueError):  # a device without a fused AdamW
        return torch.optim.AdamW(groups, weight_decay=WEIGHT_DECAY)
