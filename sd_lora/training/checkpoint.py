"""The run's folder on disk: which run owns it, resumable checkpoints, and `--resume`.

    <output>/run.json                  the settings that decide the adapter; a different run is refused
    <output>/checkpoints/step-<N>/     accelerate's state (optimizer, RNGs) and the trainer's (LoRA weights in fp32,
                                       exact; step; schedule), and <name>.safetensors, the adapter at step N

A checkpoint is written into a hidden temporary folder and renamed into place once complete, and old ones are renamed
away before they are deleted, so a run killed at any moment leaves only whole checkpoints under `step-<N>` names:
`--resume latest` can never pick a half-written one. Only the main process writes; every process calls `save`
(accelerate saves each process's RNG state).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sd_lora.training.config import RESERVED_NAME, TrainConfig, UsageError

RUN_FILE = f"{RESERVED_NAME}.json"  # not an adapter name: <name>.json is its A1111 sidecar
STATE_FILE = "trainer_state.json"  # marks a checkpoint folder; human-readable step and loss
_STEP_DIR = re.compile(r"step-(\d+)")
# The settings that decide what a run produces. Two runs that agree on all of them are the same run.
IDENTITY = ("images", "token", "prompt", "class_prompt", "num_class_images", "prior_weight", "resolution", "flip",
            "targets", "rank", "alpha", "text_encoder", "lr", "te_lr", "optimizer", "lr_scheduler", "warmup_steps",
            "max_grad_norm", "steps", "epochs", "batch_size", "grad_accum", "seed", "min_snr_gamma", "noise_offset",
            "model", "name")
# A resumed run may train longer or shorter than the run it continues; everything else must match.
RESUMABLE_CHANGES = ("steps", "epochs")


# ---------------------------------------------------------------------------------------------------------------
# Which run owns the output folder


def identity(cfg: TrainConfig) -> dict:
    values = {name: getattr(cfg, name) for name in IDENTITY}
    values["images"] = str(Path(cfg.images).expanduser().resolve())
    return values


def check_output(cfg: TrainConfig) -> Path | None:
    """Before anything loads or is written: refuse an output folder that holds another run, or this run's
    checkpoints, unless --resume or --overwrite says what to do with it; refuse a --resume with nothing to resume.
    Returns the checkpoint to resume from, or None."""
    output = Path(cfg.output)
    previous = _read_json(output / RUN_FILE)
    if cfg.resume is not None:
        found = find_checkpoint(cfg.resume, output)
        _check_same_run(cfg, _read_json(found / RUN_FILE), where=str(found))
        if previous is not None:
            _check_same_run(cfg, previous, where=str(output))
        step = (_read_json(found / STATE_FILE) or {}).get("step")
        if cfg.epochs is None and isinstance(step, int) and step >= cfg.steps:
            raise UsageError(f"--resume: {found} is at step {step}, and --steps {cfg.steps} leaves nothing to train; "
                             f"pass --steps above {step} to train on")
        return found
    if previous is None or cfg.overwrite or abandoned(output):
        return None
    if previous.get("identity") != identity(cfg):
        field = _first_difference(identity(cfg), previous.get("identity") or {})
        resume = "--resume latest to continue that run, " if checkpoints(output) else ""
        raise UsageError(f"{output} holds a different run ({field}); pass {resume}--overwrite to replace it, or "
                         "choose another --output")
    if checkpoints(output):
        raise UsageError(f"{output} already holds this run, with checkpoints up to step {checkpoints(output)[-1][0]};"
                         " pass --resume latest to continue it or --overwrite to start over")
    return None


def check_writable(cfg: TrainConfig) -> None:
    """Before anything loads: the folders the run writes (--output, --cache-dir, a class-images folder still to be
    made) can be made and written. A probe folder is created in the deepest existing parent and removed again."""
    for flag, folder in (("--output", cfg.output), ("--cache-dir", cfg.cache_dir),
                         ("--class-images", cfg.class_images)):
        if not folder:
            continue
        path = Path(folder).expanduser()
        existing = next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())
        if not existing.is_dir():
            where = "is a file" if existing == path else f"cannot be made: {existing} is a file"
            raise UsageError(f"{flag} {folder}: {where}, not a folder")
        if flag == "--class-images" and existing == path:
            continue  # a full class-image folder is only read: it may be read-only
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".sd-lora-probe-", dir=existing))
        except OSError as e:
            raise UsageError(f"{flag} {folder}: cannot write in {existing} ({e.strerror or e})") from None


def _check_same_run(cfg: TrainConfig, saved: dict | None, where: str) -> None:
    if saved is None:
        raise UsageError(f"--resume: {where} has no {RUN_FILE}; it is not a checkpoint of an sd-lora run")
    ours = {k: v for k, v in identity(cfg).items() if k not in RESUMABLE_CHANGES}
    theirs = {k: v for k, v in (saved.get("identity") or {}).items() if k not in RESUMABLE_CHANGES}
    if ours != theirs:
        raise UsageError(f"--resume: {where} comes from a different run ({_first_difference(ours, theirs)}); "
                         "only --steps and --epochs may change when resuming")


def _first_difference(ours: dict, theirs: dict) -> str:
    for key, value in ours.items():
        if value != theirs.get(key):
            return f"--{key.replace('_', '-')} {theirs.get(key)!r} there, {value!r} here"
    return "its settings differ"


def abandoned(output: Path) -> bool:
    """The folder holds a run that stopped before its first checkpoint (killed, or failed early): nothing in it is
    worth keeping, so a new run may take it over without --overwrite."""
    previous = _read_json(output / RUN_FILE)
    if previous is None or checkpoints(output):
        return False
    name = (previous.get("identity") or {}).get("name") or ""
    return not (name and (output / f"{name}.safetensors").exists())


def clear_previous_run(output: Path) -> None:
    """--overwrite: remove what an earlier run wrote (its adapter, checkpoints, samples, logs), not other files.
    Class images stay: they depend only on the model and the class prompt, and take long to make."""
    previous = _read_json(output / RUN_FILE)
    if previous is None:
        return
    name = (previous.get("identity") or {}).get("name") or ""
    for entry in ("checkpoints", "samples", "logs", "diffusers", "loss.png", RUN_FILE):
        _remove(output / entry)
    for suffix in (".safetensors", ".preview.png", ".json"):
        if name:
            _remove(output / f"{name}{suffix}")


def write_run(cfg: TrainConfig, **extra) -> None:
    """Record which run owns the folder (main process only)."""
    _write_json(Path(cfg.output) / RUN_FILE, {"identity": identity(cfg), **extra})


# ---------------------------------------------------------------------------------------------------------------
# Finding checkpoints


def checkpoints(output: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under <output>/checkpoints, oldest first."""
    root = Path(output) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.fullmatch(entry.name)
        if match and (entry / STATE_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def find_checkpoint(resume: str, output: Path) -> Path:
    """The folder --resume names: 'latest' (the newest under the output folder), a checkpoint folder, or a run's
    output folder (its newest checkpoint)."""
    if resume == "latest":
        found = checkpoints(output)
        if not found:
            raise UsageError(f"--resume latest: {output} holds no checkpoint to resume (they are saved every "
                             "--save-every steps under <output>/checkpoints); start without --resume")
        return found[-1][1]
    path = Path(resume).expanduser()
    if (path / STATE_FILE).is_file():
        return path
    if checkpoints(path):
        return checkpoints(path)[-1][1]
    raise UsageError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE}) nor an output folder with "
                     "checkpoints; use 'latest' or a <output>/checkpoints/step-<N> folder")


# ---------------------------------------------------------------------------------------------------------------
# Saving and loading


def register(accelerator, objects: list) -> None:
    """Checkpoint `objects` (anything with state_dict/load_state_dict) along with accelerate's own state. The trainer
    registers its LoRA weights this way, so a checkpoint holds a few MB, not the frozen UNet."""
    for obj in objects:
        accelerator.register_for_checkpointing(obj)


def save(accelerator, output: str | os.PathLike, step: int, keep: int, write_files: Callable[[Path], None],
         state: dict) -> Path:
    """Save a resumable checkpoint for `step` atomically; keep the newest `keep`. Every process must call it.
    `write_files(folder)` adds files (the adapter) on the main process."""
    root = Path(output) / "checkpoints"
    final, tmp = root / f"step-{step}", root / f".step-{step}.tmp"
    if accelerator.is_main_process:
        _remove(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_files(tmp)
        shutil.copyfile(Path(output) / RUN_FILE, tmp / RUN_FILE)
        _write_json(tmp / STATE_FILE, {"step": step, **state})  # last: its presence marks a complete folder
        _fsync_tree(tmp)
        if final.exists():
            _remove(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        for _, old in checkpoints(output)[:-keep]:
            _remove(old)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, checkpoint: Path) -> None:
    accelerator.load_state(str(checkpoint))


def remove_stale(output: str | os.PathLike) -> None:
    """Temporary folders a killed run left behind."""
    root = Path(output) / "checkpoints"
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith("."):
                _remove(entry)


class TrainState:
    """What a checkpoint holds besides accelerate's own state (optimizer, its RNGs): the LoRA weights, exactly, and
    the step and loss history.

    The trainer's random numbers (noise, timesteps, latent samples) come from `generator`, which `begin_step()`
    reseeds from (seed, process, step) at every optimizer step. So a checkpoint needs no generator state: accelerate
    writes custom state from the main process only, and a saved generator would come back as the main process's on
    every process of a multi-process run."""

    def __init__(self, models, seed: int, process: int = 0):
        self.models, self.seed, self.process = models, seed, process
        self.generator = torch.Generator()
        self.step, self.skipped, self.streak, self.losses = 0, 0, 0, []
        self.begin_step()

    def begin_step(self) -> None:
        """Reseed the generator for the step about to run (step `self.step + 1`)."""
        mixed = np.random.SeedSequence([self.seed, self.process, self.step]).generate_state(2, dtype=np.uint32)
        self.generator.manual_seed(int(mixed[0]) << 32 | int(mixed[1]))

    def record(self, loss: float) -> None:
        self.step += 1
        self.losses.append(loss)
        finite = math.isfinite(loss)
        self.skipped += not finite
        self.streak = 0 if finite else self.streak + 1

    def _params(self) -> dict[str, torch.nn.Parameter]:
        return {f"{i}.{n}": p for i, m in enumerate(self.models) for n, p in m.named_parameters() if p.requires_grad}

    def state_dict(self) -> dict:
        return {"step": self.step, "skipped": self.skipped, "streak": self.streak, "losses": list(self.losses),
                "lora": {n: p.detach().cpu().clone() for n, p in self._params().items()}}

    def load_state_dict(self, state: dict) -> None:
        params = self._params()
        if set(state["lora"]) != set(params):
            raise UsageError("--resume: the checkpoint holds another network (targets, rank or text encoder differ)")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state["lora"][name])
        self.step, self.skipped, self.streak = state["step"], state["skipped"], state["streak"]
        self.losses = list(state["losses"])
        self.begin_step()


# ---------------------------------------------------------------------------------------------------------------
# Small file helpers


def _remove(path: Path) -> None:
    """Delete a file or folder; a folder is first renamed to a hidden name, so a kill mid-delete leaves no
    half folder under a name that looks whole."""
    if path.is_dir() and not path.is_symlink():
        doomed = path.with_name(f".{path.name}.deleting") if not path.name.startswith(".") else path
        if doomed != path:
            shutil.rmtree(doomed, ignore_errors=True)
            os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    from sd_lora.adapter import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
