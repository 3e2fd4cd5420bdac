"""Which run owns an output folder: the settings that make a run the same run, the checks before anything loads
(another run's folder, a run training there now, folders that cannot be written), the lock a training run holds, and
--overwrite.

    <output>/run.json          the settings that decide the adapter; a different run is refused. Also the images'
                               fingerprint (data.fingerprint): the same files in another folder are the same run
                               (a moved folder resumes), and files changed in the same folder are the same run
                               trained on other data (a resume goes on, with a warning that it is not exact)
    <output>/.sd-lora.lock     held (flock) by the main process of the run training there
"""

from __future__ import annotations

import dataclasses
import errno
import operator
import os
import shlex
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from sd_lora.training import checkpoint, data
from sd_lora.training.checkpoint import read_json, remove, write_json
from sd_lora.training.config import RUN_FILE, TrainConfig, UsageError, say

try:
    import fcntl
except ImportError:  # Windows: no lock; two runs in one folder are not detected there
    fcntl = None

LOCK_FILE = ".sd-lora.lock"
# The settings that decide what a run produces. Two runs that agree on all of them are the same run.
IDENTITY = ("images", "token", "prompt", "class_prompt", "num_class_images", "prior_weight", "resolution", "flip",
            "targets", "rank", "alpha", "text_encoder", "lr", "te_lr", "optimizer", "lr_scheduler", "warmup_steps",
            "max_grad_norm", "steps", "epochs", "batch_size", "grad_accum", "seed", "min_snr_gamma", "noise_offset",
            "model", "name")
# A resumed run may train longer or shorter than the run it continues; everything else must match.
RESUMABLE_CHANGES = ("steps", "epochs")


def identity(cfg: TrainConfig) -> dict:
    values = {name: getattr(cfg, name) for name in IDENTITY}
    values["images"] = str(Path(cfg.images).expanduser().resolve())
    model = Path(cfg.model).expanduser()
    if cfg.model != "tiny" and model.exists():  # a folder or file: ./sd15, sd15/ and /abs/sd15 are one model
        values["model"] = str(model.resolve())
    return values


def check_output(cfg: TrainConfig, images: dict | None = None) -> Path | None:
    """Before anything loads or is written: refuse an output folder that holds another run, or this run's
    checkpoints, unless --resume or --overwrite says what to do with it; refuse a --resume with nothing to resume.
    Returns the checkpoint to resume from, or None. The main process says what a resume should know (the images
    folder moved, or its files changed). `images`: the images' fingerprint when the caller has taken it already."""
    check_unlocked(Path(cfg.output))
    return check_folder(cfg, images, notes=say if os.environ.get("RANK", "0") == "0" else None)


def check_folder(cfg: TrainConfig, images: dict | None = None, notes: Callable[[str], None] | None = None) \
        -> Path | None:
    """check_output without the lock check: the main process runs it again once it holds the lock (without `notes`:
    they went out the first time)."""
    output, images = Path(cfg.output), fingerprint(cfg) if images is None else images
    previous = owner(output)
    if cfg.resume is not None:
        return _check_resume(cfg, output, previous, images, notes)
    saved = checkpoint.checkpoints(output)
    if cfg.overwrite or (previous is not None and abandoned(output)):
        return None
    if previous is None:
        adapter = f"{cfg.name}.safetensors"
        held = "checkpoints" if saved else f"an adapter {adapter}" if (output / adapter).exists() else None
        if held:
            it = "them" if saved else "it"
            raise UsageError(f"{output} holds {held} but no readable {RUN_FILE} that says which run wrote {it}; "
                             f"pass --overwrite to replace {it}, or choose another --output")
        return None
    status = _images(cfg, previous, images)
    ours, theirs = _settings(cfg, previous, status, keep=())
    if ours != theirs:  # --resume is worth suggesting only where it would be taken: --steps or --epochs differ
        resumable = saved and operator.eq(*_settings(cfg, previous, status, keep=RESUMABLE_CHANGES))
        resume = "--resume latest to continue that run, " if resumable else ""
        raise UsageError(f"{output} holds a different run ({_first_difference(ours, theirs)}); pass {resume}"
                         "--overwrite to replace it, or choose another --output")
    if saved and status == "changed":  # a resume would go on, but not as the run would have
        raise UsageError(f"{output} holds this run's checkpoints up to step {saved[-1][0]}, trained on other images "
                         f"than {cfg.images} holds now ({_changes(previous['dataset'], images)}); pass --overwrite "
                         "to start over on them, --resume latest to go on from there with them (not as the run "
                         "would have gone), or choose another --output")
    if saved:
        raise UsageError(f"{output} already holds this run, with checkpoints up to step {saved[-1][0]}; pass "
                         "--resume latest to continue it or --overwrite to start over")
    return None


def _check_resume(cfg: TrainConfig, output: Path, previous: dict | None, images: dict,
                  notes: Callable[[str], None] | None) -> Path:
    """The checkpoint --resume names, once it is known to be this run's (and the folder's run too) and to leave
    something to train. A moved images folder gets a note, changed images a warning, through `notes`."""
    try:
        found = checkpoint.find_checkpoint(cfg.resume, output)
    except UsageError as e:
        hint = _same_images_beside(cfg, output, images) if cfg.resume == "latest" else None
        raise UsageError(f"{e}. {hint}" if hint else str(e)) from None
    said = _check_same_run(cfg, read_json(found / RUN_FILE), images, where=str(found))
    if previous is not None:
        _check_same_run(cfg, previous, images, where=str(output))
    step = checkpoint.verify(found)["step"]
    if cfg.epochs is None and step >= cfg.steps:
        raise UsageError(f"--resume: {found} is at step {step}, and --steps {cfg.steps} leaves nothing to train; "
                         f"pass --steps above {step} to train on")
    if said and notes:  # only once nothing refuses the resume
        notes(said)
    return found


def _same_images_beside(cfg: TrainConfig, output: Path, images: dict) -> str | None:
    """After the images folder was renamed, the default --output (output/<token>) is another folder: name the
    folder beside it whose checkpoints trained on these very images, and the flags that continue that run."""
    if not images or not output.parent.is_dir():
        return None
    for folder in sorted(output.parent.iterdir()):
        run = owner(folder) if folder.is_dir() and folder != output else None
        if not (run and run.get("dataset") == images and checkpoint.checkpoints(folder)):
            continue
        settings = _recorded(run)
        token, name = settings.get("token"), settings.get("name")
        flags = {"--token": token}
        if isinstance(token, str) and token:
            again = dataclasses.replace(cfg, token=token, name=None, output=None).resolved()
            flags |= {"--name": None if again.name == name else name,
                      "--output": None if Path(again.output).resolve() == folder.resolve() else str(folder)}
        given = " ".join(f"{flag} {shlex.quote(str(value))}" for flag, value in flags.items() if value is not None)
        return f"{folder} holds checkpoints of a run on these same images: pass {given} to continue it"
    return None


def fingerprint(cfg: TrainConfig) -> dict[str, str]:
    """The images' fingerprint, of the files the run trains on: those the loop's scan finds."""
    return data.fingerprint(cfg.images, exclude=cfg.written_folders())


def check_apart(cfg: TrainConfig) -> None:
    """The folders the run writes are not the images folder: its previews, samples and checkpoints would become
    training data (folders inside it are left out of the scan instead)."""
    images = Path(cfg.images).expanduser().resolve()
    for flag, folder in (("--output", cfg.output), ("--cache-dir", cfg.cache_dir),
                         ("--class-images", cfg.class_images)):
        if folder and Path(folder).expanduser().resolve() == images:
            raise UsageError(f"{flag} {folder} is the --images folder: what the run writes there would become "
                             "training data; choose another folder")
    if cfg.class_images and Path(cfg.class_images).expanduser().resolve() == Path(cfg.output).expanduser().resolve():
        raise UsageError(f"--class-images {cfg.class_images} is the --output folder: the run's previews, samples "
                         "and loss plot would become class images; choose another folder (default: "
                         "<output>/class_images)")


def owner(output: Path) -> dict | None:
    """The run that owns the folder: its run.json, or, when that is missing or unreadable, the copy in its newest
    checkpoint that has one."""
    found = read_json(output / RUN_FILE)
    for _, folder in reversed(checkpoint.checkpoints(output)):
        if found is not None:
            break
        found = read_json(folder / RUN_FILE)
    return found


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
        have = _class_images_held(cfg) if flag == "--class-images" and existing == path else None
        if have is not None and have >= cfg.num_class_images:
            continue  # a full class-image folder is only read: it may be read-only
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".sd-lora-probe-", dir=existing))
        except OSError as e:
            why = e.strerror or e
            if have is not None:
                lower = f", pass --num-class-images {have}" if have else ""
                raise UsageError(f"{flag} {folder}: holds {have} of the {cfg.num_class_images} class images "
                                 f"wanted, and the missing ones cannot be written there ({why}); make it "
                                 f"writable{lower}, or choose another folder") from None
            raise UsageError(f"{flag} {folder}: cannot write in {existing} ({why})") from None


def _class_images_held(cfg: TrainConfig) -> int:
    """The usable images the class folder holds already (what the run writes or trains on elsewhere left out)."""
    from sd_lora.training.class_images import usable_class_images

    return len(usable_class_images(cfg.class_images, exclude=cfg.not_class_images()))


def _check_same_run(cfg: TrainConfig, saved: dict | None, images: dict, where: str) -> str | None:
    """Refuse to resume a checkpoint (or into a folder) of another run. Returns what the resume should say about
    the images (moved, or changed in place), or None."""
    if saved is None:
        raise UsageError(f"--resume: {where} has no {RUN_FILE}; it is not a checkpoint of an sd-lora run")
    status = _images(cfg, saved, images)
    ours, theirs = _settings(cfg, saved, status, keep=RESUMABLE_CHANGES)
    if ours != theirs:
        hint = ""
        if status == "moved" and ours["token"] != theirs.get("token"):
            hint = (f"; the token defaults to the images folder's name: pass --token "
                    f"{shlex.quote(str(theirs.get('token')))} to continue the run")
        raise UsageError(f"--resume: {where} comes from a different run ({_first_difference(ours, theirs)}); "
                         f"only --steps and --epochs may change when resuming{hint}")
    if status == "moved":
        return f"note: --resume: the images folder moved: {_recorded(saved)['images']} -> {identity(cfg)['images']}"
    if status == "changed":
        return (f"warning: --resume: the images in {cfg.images} changed since {where} was saved "
                f"({_changes(saved['dataset'], images)}): training goes on with them, but not as the original run "
                "would have")
    return None


def _settings(cfg: TrainConfig, saved: dict, images: str, keep: tuple[str, ...]) -> tuple[dict, dict]:
    """This run's settings and those `saved` records, but for `keep`, to compare. The images folder's path counts
    only when the images are "different" (see _images): other files in another folder, or another folder where
    `saved` has no fingerprint to tell (a run.json written before fingerprints)."""
    ours = {k: v for k, v in identity(cfg).items() if k not in keep}
    theirs = {k: v for k, v in _recorded(saved).items() if k not in keep}
    if images in ("moved", "changed"):
        theirs["images"] = ours["images"]
    return ours, theirs


def _images(cfg: TrainConfig, saved: dict, images: dict) -> str:
    """How this run's images compare with those of the run `saved` records: "same", "moved" (the same files in
    another folder), "changed" (other files in the same folder) or "different" (both, or another folder where
    `saved` has no fingerprint)."""
    same_path = identity(cfg)["images"] == _recorded(saved).get("images")
    recorded = saved.get("dataset")
    if not (isinstance(recorded, dict) and all(isinstance(v, str) for v in recorded.values())):
        return "same" if same_path else "different"
    if recorded == images:
        return "same" if same_path else "moved"
    return "changed" if same_path else "different"


def _changes(old: dict, new: dict) -> str:
    """What changed between two fingerprints: "1 image added, 2 removed, 1 changed, 3 recaptioned"."""
    both = old.keys() & new.keys()
    replaced = sum(old[k].split(" ")[0] != new[k].split(" ")[0] for k in both)  # another byte size
    counts = {"added": len(new.keys() - old.keys()), "removed": len(old.keys() - new.keys()),
              "changed": replaced, "recaptioned": sum(old[k] != new[k] for k in both) - replaced}
    parts = [f"{n} {what}" for what, n in counts.items() if n]
    if not parts:
        return "the same files"
    first = parts[0].split(" ", 1)
    parts[0] = f"{first[0]} image{'s' * (first[0] != '1')} {first[1]}"
    return ", ".join(parts)


def _recorded(run: dict) -> dict:
    """The settings a run.json records ({} when it holds none)."""
    settings = run.get("identity")
    return settings if isinstance(settings, dict) else {}


def _first_difference(ours: dict, theirs: dict) -> str:
    for key, value in ours.items():
        if value != theirs.get(key):
            return f"--{key.replace('_', '-')} {theirs.get(key)!r} there, {value!r} here"
    return "its settings differ"


def abandoned(output: Path) -> bool:
    """The folder holds a run that stopped before its first checkpoint (killed, or failed early): nothing in it is
    worth keeping, so a new run may take it over without --overwrite."""
    previous = read_json(output / RUN_FILE)
    if previous is None or checkpoint.checkpoints(output):
        return False
    name = _recorded(previous).get("name") or ""
    return not (name and (output / f"{name}.safetensors").exists())


class OutputLock:
    """The main process's claim on the output folder for as long as it trains: an exclusive flock on
    <output>/.sd-lora.lock, which holds its process id. The kernel drops it when the process ends, however it ends,
    so a killed run never leaves a stale lock. A folder made only to hold the lock is removed again on release()."""

    def __init__(self, output: Path):
        self.output, self.made = output, not output.exists()
        try:
            output.mkdir(parents=True, exist_ok=True)
            self.fd = _open_lock(output, os.O_RDWR | os.O_CREAT)
        except OSError as e:
            raise UsageError(f"{output / LOCK_FILE}: cannot be used as the run's lock file ({e.strerror or e})") \
                from None
        if fcntl is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self.fd)
                raise UsageError(_locked_message(output)) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.made and os.listdir(self.output) == [LOCK_FILE]:  # the run failed before writing anything
            os.unlink(self.output / LOCK_FILE)
            os.rmdir(self.output)
        os.close(self.fd)


def _open_lock(output: Path, flags: int) -> int:
    """The lock file, never through a symlink (a planted link would have its target overwritten), and only a
    regular file."""
    fd = os.open(output / LOCK_FILE, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return fd


def check_unlocked(output: Path) -> None:
    """Refuse an output folder another run is training in (its main process holds the lock)."""
    if fcntl is None or not os.path.lexists(output / LOCK_FILE):
        return
    try:
        fd = _open_lock(output, os.O_RDONLY)
    except OSError as e:
        raise UsageError(f"{output / LOCK_FILE}: cannot be used as the run's lock file ({e.strerror or e}); "
                         "remove it") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UsageError(_locked_message(output)) from None
    finally:
        os.close(fd)


def _locked_message(output: Path) -> str:
    try:
        pid = (output / LOCK_FILE).read_text().strip()
    except OSError:
        pid = ""
    who = f" (process {pid})" if pid.isdigit() else ""
    return (f"{output}: another sd-lora run{who} is training in this folder; wait for it to finish, stop it, or "
            "choose another --output")


def clear_previous_run(output: Path, name: str) -> None:
    """--overwrite: remove what an earlier run wrote (its adapter, checkpoints, samples, logs), not other files.
    `name`: this run's adapter name; the earlier run's comes from its run.json. Class images stay: they depend only
    on the model and the class prompt, and take long to make."""
    previous = owner(output) or {}
    for entry in ("checkpoints", "samples", "logs", "diffusers", "loss.png", RUN_FILE):
        remove(output / entry)
    for old in {name, _recorded(previous).get("name") or name}:
        for suffix in (".safetensors", ".preview.png", ".json"):
            remove(output / f"{old}{suffix}")


def write_run(cfg: TrainConfig, dataset: dict | None = None, **extra) -> None:
    """Record which run owns the folder, and the images' fingerprint (main process only). `dataset`: the fingerprint
    taken when the run scanned its images (files changed while the model loaded are not what it trains on);
    default: taken now."""
    write_json(Path(cfg.output) / RUN_FILE,
               {"identity": identity(cfg), "dataset": fingerprint(cfg) if dataset is None else dataset, **extra})
