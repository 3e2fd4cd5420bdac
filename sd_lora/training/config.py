"""TrainConfig: every setting of a training run as one plain dataclass, plus its validation.

Each field carries its command-line help, so `add_arguments` builds train/style.py's flags from this one table and
the defaults live in exactly one place. Fields left as None are filled by `resolved()` from the others (token from
the folder name, prompt from the token, ...); resolution and mixed precision depend on the model and the device, so
the loop settles those.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path


class UsageError(ValueError):
    """Bad input from the user (a flag, a folder). The CLI prints the message on one line and exits with code 2."""


class ConfigError(UsageError):
    """A setting has a bad value; the message names the flag."""


class TrainingError(RuntimeError):
    """Training cannot go on (the loss stayed NaN/Inf). The CLI prints the message on one line and exits with code 1."""


DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_PROMPT = "an image in the style of {token}"
# Learning rates: kohya's and diffusers' usual LoRA rates for Stable Diffusion checkpoints. The built-in tiny model
# (1.4M-parameter UNet, trained itself at 1e-3) barely moves at those in 1000 steps: on the mozart_art demo the style
# score reached 0.09 at 1e-4/5e-5 and 0.75 at 1e-3/1e-3 (bench/RESULTS.md, "style"), so --model tiny defaults to that.
DEFAULT_LR = {"unet": 1e-4, "text_encoder": 5e-5}
TINY_LR = {"unet": 1e-3, "text_encoder": 1e-3}
MAX_SEED = 2**32 - 1
RESERVED_NAME = "run"  # not an adapter name: <output>/run.json sits next to the adapter's <name>.json sidecar
RUN_FILE = f"{RESERVED_NAME}.json"  # which run owns the output folder (run_folder.py)
DEFAULT_SAMPLE_PROMPTS = ("a portrait in the style of {token}", "a landscape in the style of {token}")
# Flags the parser leaves None unless given, so that a default never counts as a choice: --epochs overrides --steps
# in a TrainConfig, which would silently drop a --steps the user typed along with it.
UNSET_UNLESS_GIVEN = ("steps",)

CHOICES = {
    "targets": ("cross-attn", "attn", "full"),
    "optimizer": ("adamw", "adamw8bit"),
    "lr_scheduler": ("constant", "cosine", "linear"),
    "mixed_precision": ("auto", "fp16", "bf16", "no"),
    "attention": ("sdpa", "xformers"),
    "log_with": ("auto", "tensorboard", "none"),
    "save_format": ("kohya", "diffusers"),
}


def _opt(default, help: str, type=None, **argparse_kwargs):
    """A config field whose metadata says how it appears on the command line."""
    return field(default=default, metadata={"help": help, "type": type, **argparse_kwargs})


@dataclass
class TrainConfig:
    # Data
    images: str = _opt("", "folder of training images, searched recursively (jpg, jpeg, png, webp, bmp)", str,
                       required=True)
    token: str | None = _opt(None, "trigger token (default: the images folder's name)", str)
    prompt: str | None = _opt(None, f"caption for images without a .txt/.caption sidecar; {{token}} is replaced "
                                    f"(default: '{DEFAULT_PROMPT}')", str)
    class_prompt: str | None = _opt(None, "turns on prior preservation with this class prompt, e.g. 'a painting'",
                                    str)
    class_images: str | None = _opt(None, "folder of class images (default: <output>/class_images)", str)
    num_class_images: int = _opt(100, "class images wanted; missing ones are generated with the base model", int)
    prior_weight: float = _opt(1.0, "weight of the prior-preservation loss", float)
    resolution: int | None = _opt(None, "training resolution, a multiple of 8 (default: the model's native size)",
                                  int)
    flip: bool = _opt(True, "random horizontal flips")
    cache: bool = _opt(True, "cache latents (and text embeddings when the text encoder is frozen)")
    cache_dir: str | None = _opt(None, "keep cached latents on disk in this folder instead of in RAM", str)
    # Network
    targets: str = _opt("cross-attn", "which modules get LoRA layers", str)
    rank: int = _opt(4, "LoRA rank", int)
    alpha: float | None = _opt(None, "LoRA alpha (default: the rank, i.e. scale 1)", float)
    text_encoder: bool = _opt(True, "also train the text encoder (--no-text-encoder trains the UNet only)")
    # Optimisation
    lr: float | None = _opt(None, f"UNet learning rate (default {DEFAULT_LR['unet']:g}; {TINY_LR['unet']:g} for the "
                                  f"tiny model)", float)
    te_lr: float | None = _opt(None, f"text-encoder learning rate (default {DEFAULT_LR['text_encoder']:g}; "
                                     f"{TINY_LR['text_encoder']:g} for the tiny model)", float)
    optimizer: str = _opt("adamw", "optimizer (adamw8bit needs the bnb extra and CUDA)", str)
    lr_scheduler: str = _opt("constant", "learning-rate schedule after warmup", str)
    warmup_steps: int = _opt(0, "linear warmup steps", int)
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 turns clipping off)", float)
    steps: int = _opt(1000, "optimizer steps", int)
    epochs: int | None = _opt(None, "train for this many passes over the images instead of --steps", int)
    batch_size: int = _opt(1, "images per batch", int)
    grad_accum: int = _opt(1, "batches per optimizer step", int)
    seed: int = _opt(0, "random seed; a CPU run with the same seed is reproducible bit for bit", int)
    min_snr_gamma: float | None = _opt(None, "Min-SNR loss weighting gamma (e.g. 5); off by default", float)
    noise_offset: float = _opt(0.0, "noise offset (e.g. 0.05); 0 turns it off", float)
    # Precision, memory and speed
    mixed_precision: str = _opt("auto", "auto: fp16 on CUDA and no on CPU, unless `accelerate launch "
                                "--mixed_precision` (or its config) chose fp16 or bf16", str)
    gradient_checkpointing: bool = _opt(False, "trade compute for memory")
    attention: str = _opt("sdpa", "attention implementation (xformers must be installed)", str)
    compile: bool = _opt(False, "torch.compile the UNet (and a trained text encoder): the first step of each "
                                "bucket compiles (minutes), the rest run faster; the CPU needs a C++ compiler")
    # Samples, logs, checkpoints, output
    sample_every: int = _opt(250, "make sample images every N steps (0: only at the end)", int)
    sample_prompts: tuple[str, ...] | None = _opt(None, "prompts for sample images (default: two prompts with the token)",
                                            str, nargs="+")
    log_with: str = _opt("auto", "auto: TensorBoard when it is installed", str)
    save_every: int = _opt(250, "save a resumable checkpoint every N steps (0: only at the end)", int)
    keep_checkpoints: int = _opt(3, "how many of the newest checkpoints to keep", int)
    resume: str | None = _opt(None, "'latest' or a checkpoint folder to continue from", str)
    output: str | None = _opt(None, "output folder (default: output/<name>)", str)
    name: str | None = _opt(None, "adapter name, used for the file name (default: the token)", str)
    save_format: str = _opt("kohya", "kohya is always written; diffusers also writes the diffusers format", str)
    dataset_metadata: bool = _opt(True, "store caption tag counts (ss_tag_frequency) in the adapter file; "
                                        "--no-dataset-metadata keeps captions private")
    overwrite: bool = _opt(False, "replace an output folder that holds a different run")
    model: str = _opt(DEFAULT_MODEL, "base model: hub id, diffusers folder, single .safetensors file, or 'tiny'",
                      str)

    def validate(self) -> TrainConfig:
        """Raise ConfigError naming the first bad value; return self so calls chain."""
        for name, choices in CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise ConfigError(f"{_flag(name)}: unknown value {value!r} (choose from {', '.join(choices)})")
        if not str(self.images).strip():
            raise ConfigError("--images: a folder of training images is required")
        for f in dataclasses.fields(self):  # inf overflows the fp16 adapter; nan would pass a `not < 0` test
            value = getattr(self, f.name)
            if isinstance(value, float):
                _require(self, f.name, math.isfinite(value), "must be a finite number")
        _require(self, "seed", self.seed <= MAX_SEED, f"must be at most {MAX_SEED}")
        for name in ("rank", "steps", "batch_size", "grad_accum", "num_class_images", "keep_checkpoints"):
            _require(self, name, getattr(self, name) > 0, "must be a positive integer")
        for name in ("warmup_steps", "sample_every", "save_every", "seed", "noise_offset", "prior_weight",
                     "max_grad_norm"):
            _require(self, name, getattr(self, name) >= 0, "must not be negative")
        for name in ("lr", "te_lr", "alpha", "epochs", "min_snr_gamma"):
            value = getattr(self, name)
            _require(self, name, value is None or value > 0, "must be greater than 0")
        if self.resolution is not None:
            _require(self, "resolution", self.resolution > 0 and self.resolution % 8 == 0,
                     "must be a positive multiple of 8")
        for name in ("token", "name", "images", "output", "cache_dir", "class_images", "model"):
            value = getattr(self, name)
            _require(self, name, value is None or value.strip() != "", "must not be empty")
        if self.name is not None:
            _require(self, "name", not any(c in self.name for c in '/\\:*?"<>|'),
                     "must be usable as a file name (no / \\ : * ? \" < > |)")
            _require(self, "name", not self.name.startswith("."), "must not start with '.' (a hidden file)")
            _require(self, "name", self.name.lower() != RESERVED_NAME,
                     f"is reserved: <output>/{RESERVED_NAME}.json records the run's settings")
        if self.sample_prompts is not None:
            _require(self, "sample_prompts", all(p.strip() for p in self.sample_prompts),
                     "must not contain an empty prompt")
        if self.class_images is not None and self.class_prompt is None:
            raise ConfigError("--class-images: needs --class-prompt (prior preservation is off without it)")
        if self.class_prompt is not None:
            _require(self, "class_prompt", self.class_prompt.strip() != "", "must not be empty")
        if self.resume is not None and self.overwrite:
            raise ConfigError("--resume and --overwrite cannot be used together")
        return self

    def written_folders(self) -> list[str]:
        """The folders the run writes or generates into (output, cache, class images), left out of the --images
        scan: their previews, samples and checkpoints are not training data."""
        return [p for p in (self.output, self.cache_dir, self.class_images) if p]

    def not_class_images(self) -> list[str]:
        """The folders left out of the class-image folder's scan: the training images, the output and the cache."""
        return [p for p in (self.images, self.output, self.cache_dir) if p]

    def resolved(self) -> TrainConfig:
        """A validated copy with the derived defaults filled in: token, prompt, alpha, learning rates, name, output,
        class images, sample prompts. Resolution and mixed precision stay as given (they depend on the model and
        device)."""
        self.validate()
        token = valid_text(self.token or Path(self.images).expanduser().resolve().name).strip()
        name = self.name or _safe_name(token)
        output = self.output or str(Path("output") / name)
        prompts = tuple(valid_text(p) for p in self.sample_prompts or DEFAULT_SAMPLE_PROMPTS)
        rates = TINY_LR if self.model == "tiny" else DEFAULT_LR
        return dataclasses.replace(
            self,
            token=token,
            prompt=valid_text(self.prompt or DEFAULT_PROMPT).replace("{token}", token),
            class_prompt=None if self.class_prompt is None else valid_text(self.class_prompt),
            alpha=float(self.rank) if self.alpha is None else self.alpha,
            lr=self.lr if self.lr is not None else rates["unet"],
            te_lr=self.te_lr if self.te_lr is not None else rates["text_encoder"],
            name=name,
            output=output,
            class_images=(self.class_images or str(Path(output) / "class_images")) if self.class_prompt else None,
            sample_prompts=tuple(p.replace("{token}", token) for p in prompts),
        )

    @property
    def prior_preservation(self) -> bool:
        return self.class_prompt is not None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _require(config: TrainConfig, name: str, ok: bool, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{_flag(name)}: {problem} (got {getattr(config, name)!r})")


def valid_text(value: str) -> str:
    """Valid text from a folder name or a flag: bytes that are not UTF-8 reach Python as surrogates, which the
    tokenizer and TensorBoard reject; they become U+FFFD."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def say(message: str) -> None:
    """One line on stderr (a warning or a note), as valid text: file names may hold bytes that are not UTF-8."""
    print(valid_text(message), file=sys.stderr, flush=True)


def one_line(e: Exception, limit: int | None = None) -> str:
    """An exception's message as one line for an error of ours: its first line, cut at a word after `limit`."""
    lines = str(e).strip().splitlines()
    line = lines[0] if lines else type(e).__name__
    return line if limit is None or len(line) <= limit else line[:limit].rsplit(" ", 1)[0] + " ..."


def _safe_name(token: str) -> str:
    """A file-name-safe adapter name from a token (folder names may hold spaces or separators)."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in token).strip("._") or "lora"
    return f"{cleaned}_lora" if cleaned.lower() == RESERVED_NAME else cleaned


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one flag per TrainConfig field (`--te-lr` for te_lr; booleans get --x/--no-x)."""
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        help_text = meta.pop("help")
        kind = meta.pop("type")
        if kind is None:  # a boolean switch
            parser.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=f.default, help=f"{help_text} (default: {'on' if f.default else 'off'})")
            continue
        default_note = "" if f.default in (None, "") or "default" in help_text else f" (default: {f.default})"
        parser.add_argument(_flag(f.name), dest=f.name, type=kind, choices=CHOICES.get(f.name),
                            default=None if f.name in UNSET_UNLESS_GIVEN else f.default,
                            help=help_text + default_note, **meta)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig for parsed flags (not yet validated). Raises ConfigError for flags that exclude each
    other."""
    if args.steps is not None and args.epochs is not None:
        raise ConfigError(f"--steps {args.steps} and --epochs {args.epochs} both say how long to train: pass one "
                          "of them")
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    for f in dataclasses.fields(TrainConfig):
        if f.name in UNSET_UNLESS_GIVEN and values[f.name] is None:
            values[f.name] = f.default
    if values["sample_prompts"] is not None:
        values["sample_prompts"] = tuple(values["sample_prompts"])
    return TrainConfig(**values)
