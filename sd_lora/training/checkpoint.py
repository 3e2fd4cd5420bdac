"""Resumable checkpoints and `--resume` (which run owns the output folder: run_folder.py).

    <output>/checkpoints/step-<N>/     accelerate's state (optimizer, RNGs: tensors, read back weights-only),
                                       trainer_lora.safetensors (the LoRA weights in fp32, exact),
                                       trainer_state.json (step, losses, schedule, data position),
                                       and <name>.safetensors, the adapter at step N

Nothing in a checkpoint is unpickled: accelerate reads its own files with torch's weights-only loader, and the
trainer's state is safetensors and JSON, so `--resume` of a checkpoint from elsewhere cannot run code.

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
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from sd_lora.training.config import RUN_FILE, UsageError, one_line, say

STATE_FILE = "trainer_state.json"  # marks a checkpoint folder; step, losses, schedule, data position
LORA_FILE = "trainer_lora.safetensors"  # the LoRA weights in fp32 (the adapter beside it is fp16)
OPTIMIZER_FILE = "optimizer.bin"  # accelerate's name for the (first) optimizer's state
_STEP_DIR = re.compile(r"step-(\d+)")


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


def save(accelerator, output: str | os.PathLike, step: int, keep: int, write_files: Callable[[Path], None],
         state: TrainState, scheduler) -> Path:
    """Save a resumable checkpoint for `step` atomically; keep the newest `keep`. Every process must call it.
    `write_files(folder)` adds files (the adapter) on the main process."""
    root = Path(output) / "checkpoints"
    final, tmp = root / f"step-{step}", root / f".step-{step}.tmp"
    if accelerator.is_main_process:
        remove(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # optimizer, fp16 loss scaler, each process's RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_files(tmp)
        shutil.copyfile(Path(output) / RUN_FILE, tmp / RUN_FILE)
        (tmp / LORA_FILE).write_bytes(safetensors.torch.save(state.lora()))
        write_json(tmp / STATE_FILE, {**state.summary(), "processes": accelerator.num_processes,
                                       "lr_scheduler": scheduler.state_dict()})  # last: marks a complete folder
        _fsync_tree(tmp)
        if final.exists():
            remove(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        for _, old in checkpoints(output)[:-keep]:
            remove(old)
    accelerator.wait_for_everyone()
    return final


def verify(folder: Path) -> dict:
    """Before the model loads: read what --resume will read from a checkpoint folder, so a corrupt or foreign one
    gets one clear error now. Returns its trainer_state.json. Tensors are read with torch's weights-only loader, so
    a pickle that would run code is refused, not run."""
    from accelerate.utils import load as load_tensors

    saved = read_json(folder / STATE_FILE) or {}
    problems = [k for k, ok in _STATE_CHECKS.items() if not _holds(ok, saved)]
    if problems:
        raise UsageError(f"--resume: {folder / STATE_FILE}: not a readable sd-lora trainer state (no valid "
                         f"{', '.join(problems)}); resume from another checkpoint")
    _read_lora(folder)
    if not (folder / OPTIMIZER_FILE).is_file():
        raise UsageError(f"--resume: {folder / OPTIMIZER_FILE}: missing; resume from another checkpoint")
    for path in sorted(folder.iterdir()):
        if path.suffix in (".bin", ".pkl", ".pt"):
            try:
                with warnings.catch_warnings():  # torch warns about the pickle protocol before refusing
                    warnings.simplefilter("ignore")
                    load_tensors(path, map_location="cpu")
            except Exception as e:  # noqa: BLE001
                raise UsageError(f"--resume: {path}: cannot be read as weights-only tensors ({one_line(e, 200)}); "
                                 "it is corrupt, or a pickle that could run code, and is not loaded") from None
    return saved


def _holds(ok: Callable[[dict], bool], saved: dict) -> bool:
    try:
        return bool(ok(saved))
    except (KeyError, TypeError, ValueError, AttributeError):
        return False


def _number(x) -> bool:
    return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))


_STATE_CHECKS: dict[str, Callable[[dict], bool]] = {  # what a trainer_state.json must hold, field by field
    "step": lambda d: type(d["step"]) is int and d["step"] >= 0,
    "batches": lambda d: type(d["batches"]) is int and d["batches"] >= d["step"],
    "processes": lambda d: type(d["processes"]) is int and d["processes"] >= 1,
    "skipped": lambda d: type(d["skipped"]) is int and 0 <= d["skipped"] <= d["step"],
    "streak": lambda d: type(d["streak"]) is int and 0 <= d["streak"] <= d["skipped"],
    "losses": lambda d: len(d["losses"]) == d["step"] and all(map(_number, d["losses"])),
    "lr_scheduler": lambda d: d["lr_scheduler"]["last_epoch"] == d["step"]
    and all(map(_number, d["lr_scheduler"]["base_lrs"])),
}


def _read_lora(folder: Path) -> dict[str, torch.Tensor]:
    """trainer_lora.safetensors, read as bytes (safetensors' own file functions need UTF-8 path names)."""
    try:
        tensors = safetensors.torch.load((folder / LORA_FILE).read_bytes())
    except Exception as e:  # noqa: BLE001 - missing, truncated, not safetensors: one message
        raise UsageError(f"--resume: {folder / LORA_FILE}: cannot be read ({one_line(e, 200)})") from None
    if not tensors or any(t.dtype != torch.float32 or not torch.isfinite(t).all() for t in tensors.values()):
        raise UsageError(f"--resume: {folder / LORA_FILE}: does not hold finite fp32 LoRA weights")
    return tensors


def load(accelerator, folder: Path, state: TrainState, scheduler) -> dict:
    """Restore a checkpoint `verify` accepted: accelerate's state, the LoRA weights, step and schedule. Returns its
    trainer_state.json."""
    saved = verify(folder)
    state.restore(saved, _read_lora(folder))  # first: a checkpoint of another network gets its own message
    try:
        accelerator.load_state(str(folder))
        scheduler.load_state_dict(saved["lr_scheduler"])
    except Exception as e:  # noqa: BLE001 - the checkpoint does not fit this run; say which and why
        raise UsageError(f"--resume: {folder}: cannot be loaded into this run ({one_line(e, 200)})") from None
    return saved


def drop_after(output: str | os.PathLike, step: int) -> None:
    """A run resumed from step `step` starts a new history there: checkpoints of the old one past that step would
    be taken for this run's by --resume latest, so they go (with a note on stderr)."""
    later = [(s, folder) for s, folder in checkpoints(output) if s > step]
    for _, folder in later:
        remove(folder)
    if later:
        say(f"note: --resume from step {step}: removed the later checkpoints of the run it goes back on "
            f"({', '.join(folder.name for _, folder in later)})")


def remove_stale(output: str | os.PathLike) -> None:
    """Temporary folders a killed run left behind."""
    root = Path(output) / "checkpoints"
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith("."):
                remove(entry)


class TrainState:
    """What a checkpoint holds besides accelerate's own state (optimizer, its RNGs): the LoRA weights, exactly, the
    step and loss history, and the data position (`batches`: batches trained on by all processes together, so a
    resume with another number of processes goes on with the next batch).

    The trainer's random numbers (noise, timesteps, latent samples) come from `generator`, which `begin_step()`
    reseeds from (seed, process, step) at every optimizer step. So a checkpoint needs no generator state: accelerate
    writes custom state from the main process only, and a saved generator would come back as the main process's on
    every process of a multi-process run."""

    def __init__(self, models, seed: int, process: int = 0, batches_per_step: int = 1):
        self.models, self.seed, self.process, self.batches_per_step = models, seed, process, batches_per_step
        self.generator = torch.Generator()
        self.step, self.batches, self.skipped, self.streak, self.losses = 0, 0, 0, 0, []
        self.begin_step()

    def begin_step(self) -> None:
        """Reseed the generator for the step about to run (step `self.step + 1`)."""
        mixed = np.random.SeedSequence([self.seed, self.process, self.step]).generate_state(2, dtype=np.uint32)
        self.generator.manual_seed(int(mixed[0]) << 32 | int(mixed[1]))

    def record(self, loss: float) -> None:
        self.step += 1
        self.batches += self.batches_per_step
        self.losses.append(loss)
        finite = math.isfinite(loss)
        self.skipped += not finite
        self.streak = 0 if finite else self.streak + 1

    def _params(self) -> dict[str, torch.nn.Parameter]:
        return {f"{i}.{n}": p for i, m in enumerate(self.models) for n, p in m.named_parameters() if p.requires_grad}

    def lora(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in self._params().items()}

    def summary(self) -> dict:
        return {"step": self.step, "batches": self.batches, "skipped": self.skipped, "streak": self.streak,
                "losses": list(self.losses), "loss": self.losses[-1] if self.losses else None}

    def restore(self, saved: dict, lora: dict[str, torch.Tensor]) -> None:
        params = self._params()
        if set(lora) != set(params) or any(lora[n].shape != p.shape for n, p in params.items()):
            raise UsageError("--resume: the checkpoint holds another network (targets, rank or text encoder differ)")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(lora[name])
        self.step, self.batches, self.skipped, self.streak = (saved[k] for k in ("step", "batches", "skipped",
                                                                                  "streak"))
        self.losses = [float(x) for x in saved["losses"]]
        self.begin_step()


# ---------------------------------------------------------------------------------------------------------------
# Small file helpers


def remove(path: Path) -> None:
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


def read_json(path: Path) -> dict | None:
    """A JSON object from a file; None when it is missing, unreadable, not JSON or not an object."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict) -> None:
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
