"""load_pipeline(model): the one way sd_lora gets a diffusers StableDiffusionPipeline.

`model` is "tiny" (the built-in offline model), a hub id, a diffusers pipeline folder, or a single-file checkpoint
(.safetensors; .ckpt only with allow_pickle). The result is always a plain diffusers pipeline: sd_lora never
subclasses it, so anything diffusers can do with it still works.

Single files carry weights only; diffusers also needs the pipeline's configs (a local folder offline). They come from
`config=`, else $SD_LORA_SINGLE_FILE_CONFIG, else the file's own header: checkpoints sd_lora writes embed their
config files (`embedded_config`), so they load anywhere with no network and no extra folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import torch

TINY_DIR = Path(__file__).parent / "models" / "tiny"
TINY_SEED = 0
# Header key under which sd_lora's single-file checkpoints embed their diffusers config files (path -> text).
EMBEDDED_CONFIG_KEY = "sd_lora.pipeline_config"
_SAFE_CONFIG_PATH = re.compile(r"[\w.-]+(/[\w.-]+)?")  # "unet/config.json": never absolute, never ".."


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says which model and why."""


OFFLINE_HINT = "offline, use model 'tiny', a local diffusers folder or a .safetensors checkpoint"


class _Drop(logging.Filter):
    """Drops log records whose message matches `pattern` at its start."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(str(record.msg))


# transformers warns once per process that its image processors fall back to PIL without torchvision. sd_lora uses
# none of them (no safety checker), so that line only confuses: it is dropped, and nothing else from that logger.
logging.getLogger("transformers.utils.import_utils").addFilter(_Drop(r"`\w+ImageProcessor` requires torchvision"))
# diffusers 0.42 warns on every `model.to(dtype)` that "modules ... should be kept in float32: []", even when the
# model has none (its check is `[] is not None`). The line with an empty list is that false alarm and is dropped; a
# model that does keep modules in fp32 still gets the warning.
logging.getLogger("diffusers.models.modeling_utils").addFilter(
    _Drop(r"There are modules in \w+ that should be kept in float32: \[\]\."))


def default_guidance(model: str | os.PathLike) -> float:
    """The classifier-free guidance scale a model works best at: the tiny model is trained for about 2, while SD
    checkpoints use diffusers' 7.5. At 7.5 the tiny model's colors saturate and smear (see its model card)."""
    return 2.0 if str(model) == "tiny" else 7.5


def tiny_dir() -> Path:
    """The tiny model's diffusers folder (configs, tokenizer and, once trained, weights)."""
    return TINY_DIR


def load_pipeline(model: str | os.PathLike = "tiny", device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None, allow_pickle: bool = False,
                  config: str | os.PathLike | None = None):
    """Load a Stable Diffusion pipeline from "tiny", a hub id, a diffusers folder or a single checkpoint file.

    `config`: a local diffusers folder of the same architecture, used for single-file checkpoints (see above).
    `dtype`: None keeps the weights as stored, except on the CPU, where fp16/bf16 weights (a folder or file saved in
    half precision) are loaded as fp32: half-precision matmuls there are slow or unsupported."""
    from diffusers import StableDiffusionPipeline

    name = str(model)
    if name == "tiny":
        pipe = _build_tiny()
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            pipe = _from_folder(StableDiffusionPipeline, path)
        elif path.is_file():
            pipe = _from_single_file(StableDiffusionPipeline, path, allow_pickle, config)
        elif path.suffix in (".safetensors", ".ckpt", ".pt", ".bin") or name.startswith((".", "/", "~")):
            raise ModelLoadError(f"{name}: no such file or folder")
        else:
            pipe = _from_hub(StableDiffusionPipeline, name)
    pipe.set_progress_bar_config(disable=True)
    parts = [m for m in (pipe.unet, pipe.vae, pipe.text_encoder) if m is not None]
    if dtype is None and torch.device(device or "cpu").type == "cpu" and any(m.dtype != torch.float32 for m in parts):
        dtype = torch.float32  # diffusers loads a half-precision folder's UNet as fp32 but transformers keeps CLIP fp16
    if dtype is not None or device is not None:
        pipe.to(device=device, dtype=dtype)
    return pipe


def _build_tiny():
    """Build the tiny pipeline from the configs in sd_lora/models/tiny (weights from the folder when shipped)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = TINY_DIR
    # Fixed-seed init that neither depends on nor disturbs the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    for part, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        _load_shipped_weights(module, folder / part)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    scheduler = PNDMScheduler.from_config(PNDMScheduler.load_config(folder / "scheduler"))
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _load_shipped_weights(module: torch.nn.Module, folder: Path) -> None:
    """Load weights shipped next to a config (diffusers or transformers file name), if any."""
    from safetensors.torch import load_file

    for fname in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        f = folder / fname
        if f.is_file():
            state = load_file(f)
            dtype = next(module.parameters()).dtype
            module.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
            return


def _from_folder(cls, path: Path):
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
    try:
        return cls.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    except Exception as e:  # diffusers raises many types; the user needs one message
        raise ModelLoadError(f"{path}: could not load the pipeline: {e}") from e


def _from_single_file(cls, path: Path, allow_pickle: bool, config: str | os.PathLike | None = None):
    if path.suffix != ".safetensors" and not allow_pickle:
        raise ModelLoadError(f"{path}: pickle checkpoints can run code when loaded; convert it to .safetensors "
                             "or pass allow_pickle=True")
    with _config_folder(path, config) as folder:
        kwargs = {"config": str(folder)} if folder else {}
        try:
            return cls.from_single_file(str(path), safety_checker=None, requires_safety_checker=False, **kwargs)
        except Exception as e:
            hint = "" if folder else (". Offline, pass config=<a local diffusers folder of the same architecture> "
                                      "(or set SD_LORA_SINGLE_FILE_CONFIG)")
            raise ModelLoadError(f"{path}: could not load the checkpoint: {e}{hint}") from e


@contextlib.contextmanager
def _config_folder(path: Path, config: str | os.PathLike | None):
    """The diffusers config folder for a single file: the argument, the environment, or one rebuilt from the header."""
    config = config or os.environ.get("SD_LORA_SINGLE_FILE_CONFIG")
    if config:
        if not Path(config).is_dir():
            raise ModelLoadError(f"{config}: not a folder; config= must be a local diffusers pipeline folder")
        yield Path(config)
        return
    files = _embedded_files(path)
    if files is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="sd_lora_config_") as tmp:
        for rel, text in files.items():
            target = Path(tmp, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        yield Path(tmp)


def _embedded_files(path: Path) -> dict[str, str] | None:
    """Config files embedded in a safetensors header by `embedded_config`, or None when there are none."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get(EMBEDDED_CONFIG_KEY)
        files = json.loads(raw) if raw else None
    except (OSError, ValueError, SafetensorError):  # an unreadable header is for diffusers to report
        return None
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) and
                                              _SAFE_CONFIG_PATH.fullmatch(k) and ".." not in k
                                              for k, v in files.items()):
        return None
    return files


def embedded_config(pipe) -> str:
    """The pipeline's config files (model_index.json, component configs, tokenizer) as one JSON string.

    Written into the header of single-file checkpoints we produce, so `load_pipeline` reads them back offline
    without a config folder. A few tens of kB for the tiny model, about 2 MB with the full CLIP tokenizer."""
    with tempfile.TemporaryDirectory(prefix="sd_lora_config_") as tmp:
        root = Path(tmp)
        pipe.save_config(root)
        for name in ("unet", "vae", "scheduler"):
            getattr(pipe, name).save_config(root / name)
        if getattr(pipe, "text_encoder", None) is not None:
            pipe.text_encoder.config.save_pretrained(root / "text_encoder")
        if getattr(pipe, "tokenizer", None) is not None:
            pipe.tokenizer.save_pretrained(root / "tokenizer")
        files = {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}
    return json.dumps(files, sort_keys=True)


def _from_hub(cls, name: str):
    """from_pretrained, with one message when it fails. diffusers' own "Couldn't connect to the Hub ... Will try to
    load from local cache" notice is dropped: the error says it, and a cached model loads without it."""
    hub_notice = _Drop(r"Couldn't connect to the Hub")
    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    logger.addFilter(hub_notice)
    try:
        return cls.from_pretrained(name, safety_checker=None, requires_safety_checker=False)
    except Exception as e:
        raise ModelLoadError(f"{name}: {_hub_problem(e)}; {OFFLINE_HINT}") from e
    finally:
        logger.removeFilter(hub_notice)


def _hub_problem(e: BaseException) -> str:
    """What went wrong fetching a hub model, in one short clause, from the exception and its causes."""
    chain, seen = [], e
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    kinds = {type(c).__name__ for c in chain}
    if "OfflineModeIsEnabled" in kinds:
        return "not in the local Hugging Face cache, and the hub is switched off (HF_HUB_OFFLINE is set)"
    if "GatedRepoError" in kinds:
        return "a gated model: accept its terms on huggingface.co, then log in (hf auth login)"
    if "RepositoryNotFoundError" in kinds:
        return "no such model on the Hugging Face hub (or it is private: log in with hf auth login)"
    if any(isinstance(c, (ConnectionError, TimeoutError)) or type(c).__name__.endswith(("ConnectError", "Timeout"))
           for c in chain):
        cause = str(chain[-1]).splitlines()[0][:120] if str(chain[-1]) else type(chain[-1]).__name__
        return f"not in the local Hugging Face cache, and the hub cannot be reached ({cause})"
    text = str(e).splitlines()[0] if str(e) else ""
    return f"could not load the model from the Hugging Face hub ({type(e).__name__}: {text[:200]})"
