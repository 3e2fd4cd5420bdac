"""What a training run shows and leaves behind, as a user of train/style.py meets it: the start and end screens, the
progress bar, TensorBoard logs (the default when it is installed), the checkpoints' contents, the adapter's
metadata, `--resume PATH`, `--no-text-encoder` and `--no-dataset-metadata`. Tiny model, CPU, one thread.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import env, style_folder, train_config
from safetensors import safe_open

from sd_lora.training import loop, prepare

STYLE = Path(__file__).resolve().parent.parent / "train" / "style.py"
FLAGS = ["--model", "tiny", "--steps", "4", "--save-every", "2", "--sample-every", "2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One run with the default logging (no --log-with): 4 steps, checkpoints and samples every 2."""
    root = tmp_path_factory.mktemp("outputs")
    images, out = style_folder(root), root / "out"
    before = time.time()
    done = subprocess.run([sys.executable, str(STYLE), "--images", str(images), "--output", str(out), *FLAGS],
                          check=False, capture_output=True, text=True, env=env(), cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"images": images, "out": out, "stdout": done.stdout, "stderr": done.stderr, "before": int(before),
            "after": time.time()}


def metadata(path: Path) -> tuple[dict, list[str]]:
    with safe_open(str(path), "pt") as f:
        return f.metadata(), list(f.keys())


def test_the_start_and_end_screens_say_what_the_run_is_and_where_it_went(run):
    start, end = run["stdout"].split("sd-lora: done, ")
    adapter = run["out"] / "inkwash.safetensors"
    assert start.startswith("sd-lora: training a style LoRA\n")
    rows = {line.split()[0]: line.split(None, 1)[1] for line in start.splitlines()[1:] if line.strip()}
    assert rows["images"].startswith(f"4 in {run['images']}; 2 buckets: ")
    assert rows["steps"] == "4 × 1 image (batch 1 × grad-accum 1 × 1 process) = 1 epoch"
    assert "cross-attn: 28 UNet + 8 text-encoder modules, 16,128 trainable parameters (fp32)" in rows["network"]
    assert rows["memory"].startswith("frozen weights 7.4 MB, LoRA + gradients + AdamW state ")
    assert rows["output"] == f"{adapter}; samples every 2 steps, checkpoints every 2 (keep 3)"
    assert end.startswith(f"{adapter}\n")
    ends = {line.split()[0]: line.split(None, 1)[1] for line in end.splitlines()[1:] if line.strip()
            and not line.startswith(" " * 6)}
    assert ends["time"].split("s in all; ")[1].startswith("4 steps took ")
    assert ends["adapter"].startswith(f"{adapter} (")


def test_the_progress_bar_shows_the_step_rate_loss_and_lr(run):
    last = [part for part in run["stderr"].split("\r") if "training:" in part][-1]
    assert "4/4" in last and "step/s" in last and "loss=" in last and "lr=1.00e-03" in last


def test_stderr_holds_the_cpu_notice_and_the_progress_bars_only(run):
    """No library chatter: diffusers' "should be kept in float32: []" false alarm on every cast, transformers'
    torchvision notice and the like are dropped (sd_lora.pipeline); a line that is not ours would show up here."""
    parts = [p.strip() for p in re.split(r"[\r\n]", run["stderr"]) if p.strip()]
    ours = ("caching latents:", "training:", "warning: skipped ")  # the bars; the folder's bad files
    assert [p for p in parts if not p.startswith(ours)] == [
        "notice: no CUDA GPU, so training runs in fp32 on the CPU (mixed precision is for a GPU)"]


def test_tensorboard_is_the_default_and_gets_loss_lr_and_the_sample_grids(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = EventAccumulator(str(run["out"] / "logs" / "sd-lora"), size_guidance={"images": 0})
    logs.Reload()
    assert [e.step for e in logs.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.step for e in logs.Scalars("lr")] == [1, 2, 3, 4]
    assert [e.step for e in logs.Images("samples")][-1] == 4  # the last grid, at the end of the run


def test_a_checkpoint_holds_the_state_and_the_adapter_so_far(run):
    folder = run["out"] / "checkpoints" / "step-2"
    names = {p.name for p in folder.iterdir()}
    assert {"inkwash.safetensors", "optimizer.bin", "random_states_0.pkl"} <= names
    saved, keys = metadata(folder / "inkwash.safetensors")
    final, final_keys = metadata(run["out"] / "inkwash.safetensors")
    assert keys == final_keys and saved["ss_max_train_steps"] == "2" and final["ss_max_train_steps"] == "4"
    assert saved["ss_training_started_at"] == final["ss_training_started_at"]  # when the run started, not the save
    assert int(saved["ss_training_finished_at"]) <= int(final["ss_training_finished_at"])


def test_the_adapter_carries_kohya_and_modelspec_metadata(run):
    md, keys = metadata(run["out"] / "inkwash.safetensors")
    assert any(k.startswith("lora_te_") for k in keys) and any(k.startswith("lora_unet_") for k in keys)
    assert md["ss_network_module"] == "networks.lora" and md["ss_network_dim"] == "4"
    assert md["ss_network_alpha"] == "4.0" and md["ss_v2"] == "False" and md["ss_output_name"] == "inkwash"
    assert md["ss_base_model_version"] == "sd_v1" and md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md["modelspec.title"] == "inkwash" and md["modelspec.trigger_phrase"] == "inkwash"
    assert md["modelspec.resolution"] == "64x64" and md["modelspec.prediction_type"] == "epsilon"
    date = datetime.datetime.fromisoformat(md["modelspec.date"])  # with its offset, so no reader takes it as local
    assert date.utcoffset() == datetime.timedelta(0) and run["before"] - 1 <= date.timestamp() <= run["after"] + 1
    assert run["before"] <= int(md["ss_training_started_at"]) <= int(md["ss_training_finished_at"]) <= run["after"]
    assert json.loads(md["ss_tag_frequency"])["inkwash"]
    assert json.loads(md["ss_dataset_dirs"]) == {"inkwash": {"n_repeats": 1, "img_count": 4}}


def a1111_metadata(path: Path) -> dict:
    """AUTOMATIC1111's modules/sd_models.py read_metadata_from_safetensors: the raw header, then every value that
    starts with "{" json-decoded (a failure leaves the string)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert n > 2 and data[8:10] in (b'{"', b"{'")
    out = {}
    for key, value in json.loads(data[8:8 + n]).get("__metadata__", {}).items():
        assert isinstance(value, str), key  # A1111 slices and html-escapes them; kohya writes str() of every value
        out[key] = json.loads(value) if value[:1] == "{" else value
    return out


def test_a1111_reads_the_adapter_and_its_card_as_its_lora_extension_does(run):
    """extensions-builtin/Lora: network.py (alias, SD version, hash), ui_edit_user_metadata.py (the metadata table
    and the training-tag cloud), ui_extra_networks_lora.py (the <name>.json card)."""
    adapter = run["out"] / "inkwash.safetensors"
    md = a1111_metadata(adapter)
    assert md["ss_output_name"] == "inkwash"  # the alias in <lora:inkwash:1>
    assert not str(md.get("ss_base_model_version", "")).startswith("sdxl_") and md["ss_v2"] != "True"  # -> SD1
    data = adapter.read_bytes()  # hashes.addnet_hash_safetensors: sha256 of the bytes after the header
    assert md["sshs_model_hash"] == hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()
    for key in ("ss_output_name", "ss_sd_model_name", "ss_network_module"):  # html.escape(value) in the table
        assert isinstance(md[key], str)
    assert md["ss_sd_model_name"] == "tiny" and md["ss_network_module"] == "networks.lora"
    assert run["before"] <= float(md["ss_training_started_at"]) <= run["after"]  # "Date trained"
    assert sum(int(d.get("img_count", 0)) for d in md["ss_dataset_dirs"].values()) == 4  # "Dataset size"
    tags = {}  # build_tags: {dataset dir: {tag: count}}, summed over the dirs
    for per_dir in md["ss_tag_frequency"].values():
        for tag, n in per_dir.items():
            tags[tag.strip()] = tags.get(tag.strip(), 0) + int(n)
    assert tags == {"an image in the style of inkwash": 3, "inkwash": 1, "a blue circle": 1, "ink outline": 1}
    resolutions = {}  # the "Resolutions" row: ss_bucket_info's buckets, summed per resolution
    for bucket in md["ss_bucket_info"]["buckets"].values():
        key = f'{bucket["resolution"][1]}x{bucket["resolution"][0]}'
        resolutions[key] = resolutions.get(key, 0) + int(bucket["count"])
    assert sum(resolutions.values()) == 4 and len(resolutions) == 2
    shown = ", ".join(f"{w}x{h} ×{b['count']}" for b in md["ss_bucket_info"]["buckets"].values()
                      for w, h in [b["resolution"]])
    assert f"2 buckets: {shown}\n" in run["stdout"]  # the buckets the start screen listed, in its (w x h) order
    assert 0 < md["ss_bucket_info"]["mean_img_ar_error"] < 0.5  # the 96x64 images are cropped a little
    card = json.loads((run["out"] / "inkwash.json").read_text(encoding="utf8"))
    assert card["sd version"] in ("SD1", "SD2", "SDXL", "SD3", "Unknown") and card["sd version"] == "SD1"
    assert card["activation text"] == "inkwash" and float(card["preferred weight"]) == 1.0


def test_metadata_names_a_local_base_model_by_its_name_and_states_its_prediction_type(tmp_path):
    """kohya's train_network.py keeps a hub id as given but names a local model by its basename: a full path would
    show in A1111's card (and could not be stored if it held bytes that are not UTF-8). The prediction type is
    ModelSpec's value (kohya's sai_model_spec.py), which save_adapter turns into SD2's architecture."""
    import sd_lora
    from sd_lora.training import report
    from sd_lora.weights import AdapterWeights, LoRAModule

    local = tmp_path / "models" / "my\udcffsd21.safetensors"
    local.parent.mkdir()
    local.write_bytes(b"")
    times = {"started": 1.7e9, "finished": 1.7e9 + 60}
    for model, prediction, name, spec in [("stabilityai/stable-diffusion-2-1", "v_prediction", None, "v"),
                                          (str(local), "epsilon", "my\ufffdsd21.safetensors", "epsilon"),
                                          (str(local.parent) + "/", None, "models", None)]:
        cfg = train_config(tmp_path, tmp_path / "out", model=model).resolved()
        md = report.adapter_metadata(cfg, resolution=512, images=4, class_images=0, steps=2, epochs=1.0,
                                     precision="no", processes=1, tag_frequency=None, prediction_type=prediction,
                                     **times)
        assert md["ss_sd_model_name"] == (name or model) and md.get("modelspec.prediction_type") == spec
        assert md["modelspec.date"] == "2023-11-14T22:14:20+00:00"
    w = AdapterWeights({"unet.mid_block.attentions.0.proj_in": LoRAModule(torch.ones(2, 64), torch.ones(64, 2))},
                       family="sd2")
    path = sd_lora.save_adapter(w, tmp_path / "a.safetensors", metadata=report.adapter_metadata(
        cfg, resolution=512, images=4, class_images=0, steps=2, epochs=1.0, precision="no", processes=1,
        tag_frequency=None, prediction_type="epsilon", **times))
    md = a1111_metadata(path)
    assert (md["modelspec.architecture"], md["modelspec.resolution"]) == ("stable-diffusion-v2-512/lora", "512x512")
    assert (md["modelspec.prediction_type"], md["ss_v2"]) == ("epsilon", "True")


def test_resume_from_a_checkpoint_path_into_another_folder_ends_where_the_run_did(run, tmp_path):
    """--resume PATH (not `latest`): a new output folder continues from step 2 and ends bit for bit where the run
    that wrote the checkpoint ended."""
    out = tmp_path / "resumed"
    done = subprocess.run([sys.executable, str(STYLE), "--images", str(run["images"]), "--output", str(out), *FLAGS,
                           "--resume", str(run["out"] / "checkpoints" / "step-2")],
                          check=False, capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resume" in done.stdout and "step-2" in done.stdout
    with safe_open(str(out / "inkwash.safetensors"), "pt") as a, \
            safe_open(str(run["out"] / "inkwash.safetensors"), "pt") as b:
        keys = list(a.keys())
        assert keys == list(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in keys)


def test_no_text_encoder_and_no_dataset_metadata(tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "out"
    loop.train(train_config(style_folder(tmp_path), out, steps=2, text_encoder=False, dataset_metadata=False))
    optimizer = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("optimizer"))
    assert "lr 0.001 UNet, constant" in optimizer and "text encoder" not in optimizer
    md, keys = metadata(out / "inkwash.safetensors")
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert "ss_tag_frequency" not in md and "ss_dataset_dirs" not in md and "ss_bucket_info" not in md
    assert md["ss_text_encoder_lr"] == "0"


def test_the_default_resolution_is_the_models_native_size_512_for_sd15():
    """The SD1.5 UNet and VAE from their public configs, built on the meta device (no weights allocated)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from common import SD15_UNET
    from train_step import SD15_VAE

    with torch.device("meta"):
        pipe = type("Pipe", (), {"unet": UNet2DConditionModel(**SD15_UNET), "vae": AutoencoderKL(**SD15_VAE)})
    assert prepare.native_resolution(pipe) == 512
