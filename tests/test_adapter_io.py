"""sd_lora.adapter and sd_lora.formats: reading and writing files, metadata, and every kind of bad file."""

import datetime
import hashlib
import json
import re
import struct
import time

import pytest
import torch
from helpers import random_adapter
from safetensors import safe_open
from safetensors.torch import save_file

import sd_lora
from sd_lora import AdapterError, read_adapter, save_adapter
from sd_lora.weights import AdapterWeights, LoRAModule


def _same(a, b):
    assert set(a.modules) == set(b.modules)
    for name, m in a.modules.items():
        n = b.modules[name]
        torch.testing.assert_close(n.down.float(), m.down.float(), atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(n.up.float(), m.up.float(), atol=1e-3, rtol=1e-3)
        assert n.alpha_value == m.alpha_value, name


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_round_trip_keeps_every_module_and_alpha(pipe, tmp_path, fmt):
    w = random_adapter(pipe, preset="full", alphas="varied")
    save_adapter(w, tmp_path / "a.safetensors", format=fmt, dtype=torch.float32)
    back = read_adapter(tmp_path / "a.safetensors")
    assert back.format == fmt
    _same(w, back)


def test_kohya_file_layout_and_metadata(pipe, tmp_path):
    w = random_adapter(pipe, preset="cross-attn", rank=4, alphas=2.0)
    path = save_adapter(w, tmp_path / "mozart.safetensors")
    with safe_open(path, "pt") as f:
        keys, md = set(f.keys()), f.metadata()
        alpha = f.get_tensor("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha")
        down = f.get_tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q.lora_down.weight")
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in keys
    assert alpha.dim() == 0 and alpha.dtype == torch.float32 and alpha.item() == 2.0
    assert down.dtype == torch.float16  # fp16 by default, like the files people share
    assert md["ss_base_model_version"] == "sd_v1" and md["ss_v2"] == "False"
    assert md["ss_network_module"] == "networks.lora" and md["ss_network_dim"] == "4"
    assert md["ss_network_alpha"] == "2.0" and md["ss_output_name"] == "mozart"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora" and md["modelspec.title"] == "mozart"
    data = path.read_bytes()
    body = data[8 + struct.unpack("<Q", data[:8])[0]:]
    assert md["sshs_model_hash"] == hashlib.sha256(body).hexdigest()


def test_missing_alpha_means_scale_one(tmp_path):
    save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.ones(2, 64, 1, 1),
               "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.ones(64, 2, 1, 1)},
              tmp_path / "a.safetensors")
    w = read_adapter(tmp_path / "a.safetensors")
    assert w.modules["unet.mid_block.attentions.0.proj_in"].scale == 1.0


def test_diffusers_header_alpha_and_patterns(tmp_path):
    md = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern":
                                               {"mid_block.attentions.0.proj_in": 2}, "unet.rank_pattern": {}})}
    t = {"unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.ones(4, 64, 1, 1),
         "unet.mid_block.attentions.0.proj_in.lora_B.weight": torch.ones(64, 4, 1, 1),
         "unet.mid_block.attentions.0.proj_out.lora_A.weight": torch.ones(4, 64, 1, 1),
         "unet.mid_block.attentions.0.proj_out.lora_B.weight": torch.ones(64, 4, 1, 1)}
    save_file(t, tmp_path / "d.safetensors", metadata=md)
    w = read_adapter(tmp_path / "d.safetensors")
    assert w.modules["unet.mid_block.attentions.0.proj_in"].scale == 0.5
    assert w.modules["unet.mid_block.attentions.0.proj_out"].scale == 2.0


def test_peft_folder_with_adapter_config(tmp_path):
    save_file({"base_model.model.mid_block.attentions.0.proj_in.lora_A.weight": torch.ones(4, 64, 1, 1),
               "base_model.model.mid_block.attentions.0.proj_in.lora_B.weight": torch.ones(64, 4, 1, 1)},
              tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 16}))
    w = read_adapter(tmp_path / "adapter_model.safetensors")
    assert w.format == "peft" and w.modules["unet.mid_block.attentions.0.proj_in"].scale == 4.0


def test_family_from_metadata_and_shapes(tmp_path):
    t = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.ones(4, 2048),
         "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.ones(320, 4)}
    save_file(t, tmp_path / "xl.safetensors")
    assert read_adapter(tmp_path / "xl.safetensors").family == "sdxl"
    save_file(t, tmp_path / "v2.safetensors", metadata={"ss_base_model_version": "sd_v2"})
    assert read_adapter(tmp_path / "v2.safetensors").family == "sd2"


@pytest.mark.parametrize("prediction, version, arch, resolution", [
    (None, "sd_v2", "stable-diffusion-v2-768-v/lora", "768x768"),  # unknown: SD 2.1's, the common one
    ("epsilon", "sd_v2", "stable-diffusion-v2-512/lora", "512x512"),  # SD 2.x-base
    ("v", "sd_v2_v", "stable-diffusion-v2-768-v/lora", "768x768"),
])
def test_sd2_architecture_follows_the_stated_prediction_type(tmp_path, prediction, version, arch, resolution):
    """SD2-base and SD2-768-v adapters have the same shapes; kohya's sai_model_spec.py names them apart, and A1111
    sorts both under SD2 by ss_v2. A re-save keeps what the file says."""
    w = AdapterWeights({"unet.mid_block.attentions.0.proj_in": LoRAModule(torch.ones(2, 64), torch.ones(64, 2))},
                       family="sd2")
    stated = {"modelspec.prediction_type": prediction} if prediction else {}
    for name, md in (("trained", stated), ("resaved", None)):
        path = save_adapter(w, tmp_path / f"{name}.safetensors", metadata=md)
        with safe_open(path, "pt") as f:
            header = f.metadata()
        assert (header["ss_base_model_version"], header["ss_v2"]) == (version, "True")
        assert (header["modelspec.architecture"], header["modelspec.resolution"]) == (arch, resolution)
        w = read_adapter(path)


def test_modelspec_date_is_utc_with_its_offset(pipe, tmp_path):
    """Without an offset, JavaScript's Date (lora-inspector's card) and fromisoformat read it as local time."""
    before = time.time()
    path = save_adapter(random_adapter(pipe, preset="cross-attn"), tmp_path / "a.safetensors")
    with safe_open(path, "pt") as f:
        date = f.metadata()["modelspec.date"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", date)
    assert int(before) <= datetime.datetime.fromisoformat(date).timestamp() <= time.time()


# ---- bad files: one clear error that names the file and the problem ---------------------------------------------
def _kohya(**extra):
    t = {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.ones(2, 64, 1, 1),
         "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.ones(64, 2, 1, 1)}
    t.update(extra)
    return t


def test_not_safetensors(tmp_path):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(b"this is not a tensor file at all")
    with pytest.raises(AdapterError, match=r"junk\.safetensors: not a safetensors file"):
        read_adapter(p)


def test_truncated(tmp_path):
    p = tmp_path / "cut.safetensors"
    save_file(_kohya(), p)
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(AdapterError, match=r"cut\.safetensors: .*truncated"):
        read_adapter(p)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    with pytest.raises(AdapterError, match=r"empty\.safetensors: not a safetensors file, or truncated: 0 bytes"):
        read_adapter(p)


def test_pickle_refused_by_default_and_read_weights_only_when_allowed(tmp_path):
    p = tmp_path / "old.ckpt"
    torch.save(_kohya(), p)
    with pytest.raises(AdapterError, match=r"old\.ckpt: pickle files .* refused"):
        read_adapter(p)
    assert len(read_adapter(p, allow_pickle=True).modules) == 1

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(AdapterError, match=r"evil\.pt: could not read it as a weights-only pickle"):
        read_adapter(tmp_path / "evil.pt", allow_pickle=True)


def test_half_a_pair(tmp_path):
    t = _kohya()
    del t["lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"]
    save_file(t, tmp_path / "half.safetensors")
    with pytest.raises(AdapterError, match=r"half\.safetensors: module unet\.mid_block\.attentions\.0\.proj_in has "
                                           r"no lora_up"):
        read_adapter(tmp_path / "half.safetensors")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan(tmp_path, bad):
    t = _kohya()
    t["lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"][3, 1] = bad
    save_file(t, tmp_path / "nan.safetensors")
    with pytest.raises(AdapterError, match=r"nan\.safetensors: unet\.mid_block\.attentions\.0\.proj_in: up contains "
                                           r"NaN or Inf"):
        read_adapter(tmp_path / "nan.safetensors")


@pytest.mark.parametrize("key,kind", [("lora_unet_mid_block_attentions_0_proj_in.hada_w1_a", "LoHa"),
                                      ("lora_unet_mid_block_attentions_0_proj_in.lokr_w1", "LoKr")])
def test_lycoris_types_are_named(tmp_path, key, kind):
    save_file({key: torch.ones(2, 2)}, tmp_path / "ly.safetensors")
    with pytest.raises(AdapterError, match=rf"ly\.safetensors: this is a {kind} \(LyCORIS\) network"):
        read_adapter(tmp_path / "ly.safetensors")


def test_dora_files_are_named_as_dora(pipe, tmp_path):
    """A DoRA file used to get "unexpected key ... lora_magnitude_vector" (or "... dora_scale"): now one message
    says what it is. The PEFT files are the ones peft and diffusers write for LoraConfig(use_dora=True)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, use_dora=True, target_modules=["to_q", "proj_in"]))
    peft_state = get_peft_model_state_dict(pipe.unet)
    assert any(k.endswith(".lora_magnitude_vector") for k in peft_state)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "diffusers", unet_lora_layers=peft_state)
    (tmp_path / "peft").mkdir()
    save_file({k: v.contiguous() for k, v in peft_state.items()}, tmp_path / "peft" / "adapter_model.safetensors")
    stem = "lora_unet_mid_block_attentions_0_proj_in"  # what LyCORIS (dora_wd) writes: lora_down/up plus dora_scale
    save_file({f"{stem}.lora_down.weight": torch.ones(2, 64, 1, 1), f"{stem}.lora_up.weight": torch.ones(64, 2, 1, 1),
               f"{stem}.alpha": torch.tensor(2.0), f"{stem}.dora_scale": torch.ones(1, 64, 1, 1)},
              tmp_path / "kohya_dora.safetensors")
    for path in (tmp_path / "diffusers" / "pytorch_lora_weights.safetensors",
                 tmp_path / "peft" / "adapter_model.safetensors", tmp_path / "kohya_dora.safetensors"):
        with pytest.raises(AdapterError, match=rf"^{re.escape(str(path))}: this is a DoRA \(weight-decomposed LoRA\) "
                                               "network, which sd_lora does not load yet"):
            read_adapter(path)


def test_a_checkpoint_is_not_a_lora(tmp_path):
    save_file({"model.diffusion_model.out.2.weight": torch.ones(2)}, tmp_path / "ckpt.safetensors")
    with pytest.raises(AdapterError, match=r"ckpt\.safetensors: not a LoRA file"):
        read_adapter(tmp_path / "ckpt.safetensors")


def test_save_is_atomic_and_leaves_no_temp_files(pipe, tmp_path, monkeypatch):
    w = random_adapter(pipe, preset="cross-attn")
    target = tmp_path / "a.safetensors"
    save_adapter(w, target)
    before = target.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr("sd_lora.adapter.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(random_adapter(pipe, preset="cross-attn", seed=1), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]
    with pytest.raises(OSError, match="disk full"):
        save_adapter(w, tmp_path / "new" / "deeper" / "b.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # nor the folders made for it


def test_values_beyond_fp16_are_refused_in_fp16_and_kept_in_fp32(pipe, tmp_path):
    w = random_adapter(pipe, preset="cross-attn")
    module = next(iter(w.modules.values()))
    module.up[0, 0] = 1e6  # finite in fp32, Inf in fp16
    with pytest.raises(AdapterError, match=r"a\.safetensors: .*values beyond the range of float16 became Inf"):
        save_adapter(w, tmp_path / "a.safetensors")
    assert not list(tmp_path.iterdir())
    save_adapter(w, tmp_path / "a.safetensors", dtype=torch.float32)
    assert read_adapter(tmp_path / "a.safetensors").modules[next(iter(w.modules))].up[0, 0] == 1e6


def test_public_api_names():
    for name in ("load_pipeline", "attach", "Adapters", "read_adapter", "save_adapter", "AdapterWeights"):
        assert hasattr(sd_lora, name)


def test_stale_shape_metadata_is_recomputed_but_descriptions_are_kept(pipe, tmp_path):
    w = random_adapter(pipe, preset="cross-attn", rank=4, alphas=4.0)
    w.metadata = {"ss_network_dim": "64", "ss_network_alpha": "32", "modelspec.title": "Mozart",
                  "modelspec.trigger_phrase": "mozart", "ss_base_model_version": "sdxl_base_v1-0"}
    path = save_adapter(w, tmp_path / "small.safetensors")
    md = read_adapter(path).metadata
    assert (md["ss_network_dim"], md["ss_network_alpha"], md["ss_base_model_version"]) == ("4", "4.0", "sd_v1")
    assert md["modelspec.title"] == "Mozart" and md["modelspec.trigger_phrase"] == "mozart"
    assert path.stat().st_mode & 0o044  # readable by others, like any saved file


# ---- malformed files that parse as safetensors: one AdapterError naming the file, never a stray exception ----------
_STEM = "lora_unet_mid_block_attentions_0_proj_in"


@pytest.mark.parametrize("alpha,message", [(torch.tensor([1.0, 2.0]), r"alpha must be one number, got .* \(2,\)"),
                                           (torch.zeros(0), r"alpha must be one number, got .* \(0,\)")])
def test_alpha_that_is_not_one_number(tmp_path, alpha, message):
    save_file(_kohya(**{f"{_STEM}.alpha": alpha}), tmp_path / "a.safetensors")
    with pytest.raises(AdapterError, match=r"a\.safetensors: module unet\.mid_block\.attentions\.0\.proj_in: "
                                           + message):
        read_adapter(tmp_path / "a.safetensors")


def test_alpha_as_0d_or_1_element_tensor_reads_the_same(tmp_path):
    for shape in ((), (1,)):
        save_file(_kohya(**{f"{_STEM}.alpha": torch.full(shape, 4.0)}), tmp_path / "a.safetensors")
        assert read_adapter(tmp_path / "a.safetensors").modules["unet.mid_block.attentions.0.proj_in"].scale == 2.0


def test_rank_0_pair_is_refused_when_read(tmp_path):
    """Left in, alpha / rank divides by zero in the first generation after the load (or in `inspect`)."""
    save_file({f"{_STEM}.lora_down.weight": torch.ones(0, 64, 1, 1), f"{_STEM}.lora_up.weight": torch.ones(64, 0, 1, 1)},
              tmp_path / "r0.safetensors")
    with pytest.raises(AdapterError, match=r"r0\.safetensors: unet\.mid_block\.attentions\.0\.proj_in: .* rank 0"):
        read_adapter(tmp_path / "r0.safetensors")


@pytest.mark.parametrize("config,message", [
    ("[4, 8]", "lora_adapter_metadata in the header is not a JSON object"),
    (json.dumps({"unet.r": 0, "unet.lora_alpha": 4}), "r=0, lora_alpha=4; expected a positive r"),
    (json.dumps({"unet.r": 4, "unet.lora_alpha": "four"}), "lora_alpha='four'"),
    (json.dumps({"unet.r": 4, "unet.lora_alpha": 4, "unet.alpha_pattern": ["to_q"]}), "alpha_pattern cannot be read"),
])
def test_a_broken_peft_config_in_the_header_is_named(tmp_path, config, message):
    t = {"unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.ones(4, 64, 1, 1),
         "unet.mid_block.attentions.0.proj_in.lora_B.weight": torch.ones(64, 4, 1, 1)}
    save_file(t, tmp_path / "d.safetensors", metadata={"lora_adapter_metadata": config})
    with pytest.raises(AdapterError, match=r"d\.safetensors: .*" + re.escape(message)):
        read_adapter(tmp_path / "d.safetensors")


def test_an_adapter_config_beside_that_is_not_an_object_is_named(tmp_path):
    save_file({"base_model.model.mid_block.attentions.0.proj_in.lora_A.weight": torch.ones(4, 64, 1, 1),
               "base_model.model.mid_block.attentions.0.proj_in.lora_B.weight": torch.ones(64, 4, 1, 1)},
              tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text("[]")
    with pytest.raises(AdapterError, match=r"adapter_config\.json: not a JSON object"):
        read_adapter(tmp_path / "adapter_model.safetensors")


@pytest.mark.parametrize("keys", [
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"),
    ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "text_encoder.encoder.layers.0.self_attn.q_proj"),
])
def test_two_keys_for_one_module_are_refused_not_silently_merged(tmp_path, keys):
    """Which of the two would win depends on key order; the file is ambiguous, so it is refused."""
    down, up = ("lora_down.weight", "lora_up.weight") if keys[0].startswith("lora_") else ("lora_A.weight",
                                                                                          "lora_B.weight")
    t = {}
    for i, stem in enumerate(keys):
        t[f"{stem}.{down}"], t[f"{stem}.{up}"] = torch.full((2, 64), float(i)), torch.full((64, 2), float(i))
    save_file(t, tmp_path / "twice.safetensors")
    with pytest.raises(AdapterError, match=r"twice\.safetensors: two keys name the (down|up) of module "
                                           r"text_encoder\.encoder\.layers\.0\.self_attn\.q_proj"):
        read_adapter(tmp_path / "twice.safetensors")


def test_a_folder_is_named_as_a_folder(tmp_path):
    with pytest.raises(AdapterError, match=rf"{re.escape(str(tmp_path))}: is a folder, not a LoRA file"):
        read_adapter(tmp_path)


def test_an_adapter_config_beside_a_diffusers_file_is_not_its_config(pipe, tmp_path):
    """adapter_config.json belongs to the bare PEFT file PEFT saved with it; a diffusers file in the same folder (a
    library of LoRAs) keeps its own alphas instead of silently taking that config's scale."""
    w = random_adapter(pipe, preset="cross-attn", alphas=2.0)
    save_adapter(w, tmp_path / "pytorch_lora_weights.safetensors", format="diffusers", dtype=torch.float32)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 64}))
    back = read_adapter(tmp_path / "pytorch_lora_weights.safetensors")
    assert {m.scale for m in back.modules.values()} == {0.5}


def test_a_kohya_file_mixing_ldm_and_diffusers_unet_names_is_named(tmp_path):
    """It used to be read with diffusers naming, and failed on the first mismatched shape or unmatched module."""
    tensors = {}
    for stem in ("lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_q",
                 "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"):
        tensors |= {f"{stem}.lora_down.weight": torch.zeros(4, 32), f"{stem}.lora_up.weight": torch.zeros(32, 4),
                    f"{stem}.alpha": torch.tensor(4.0)}
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(AdapterError, match=re.escape(
            f"{path}: its UNet keys mix the original SD (LDM) naming, e.g. input_blocks.1.1.transformer_blocks.0."
            "attn2.to_q, with diffusers naming, e.g. down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")):
        read_adapter(path)
