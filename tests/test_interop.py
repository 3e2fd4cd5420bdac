"""Interop against the peers themselves: diffusers' load_lora_weights reads what we write, and we read what
diffusers + PEFT write, with the same outputs."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import random_adapter, te_out, unet_out
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

import sd_lora
from sd_lora.formats import ldm


def _ours(tmp_path, preset, alphas, weight=1.0):
    ref = sd_lora.load_pipeline("tiny")
    w = random_adapter(ref, preset=preset, alphas=alphas)
    sd_lora.attach(ref, mode="live").load(w, name="a", weight=weight)
    return w, ref


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_diffusers_loads_what_we_save(tmp_path, fmt):
    """Uniform alpha on the cross-attention set: the case diffusers handles, in both our formats."""
    w, ref = _ours(tmp_path, "cross-attn", alphas=2.0)
    sd_lora.save_adapter(w, tmp_path / "a.safetensors", format=fmt, dtype=torch.float32)
    peer = sd_lora.load_pipeline("tiny")
    peer.load_lora_weights(str(tmp_path), weight_name="a.safetensors", adapter_name="a")
    torch.testing.assert_close(unet_out(peer), unet_out(ref), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(te_out(peer), te_out(ref), atol=1e-5, rtol=1e-5)


def test_diffusers_loads_our_diffusers_format_with_per_module_alphas(tmp_path):
    """Our diffusers export writes exact per-module alphas (alpha_pattern), so diffusers gets them right too."""
    w, ref = _ours(tmp_path, "full", alphas="varied")
    sd_lora.save_adapter(w, tmp_path / "a.safetensors", format="diffusers", dtype=torch.float32)
    peer = sd_lora.load_pipeline("tiny")
    peer.load_lora_weights(str(tmp_path), weight_name="a.safetensors", adapter_name="a")
    torch.testing.assert_close(unet_out(peer), unet_out(ref), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(te_out(peer), te_out(ref), atol=1e-5, rtol=1e-5)


def test_we_read_diffusers_peft_adapters_with_alpha_not_rank(tmp_path):
    peer = sd_lora.load_pipeline("tiny")
    torch.manual_seed(0)
    peer.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"],
                                     alpha_pattern={"attn2.to_q": 3}))
    peer.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=5, init_lora_weights="gaussian",
                                             target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    with torch.no_grad():  # gaussian init leaves B at zero; give B values so the test can fail
        for model in (peer.unet, peer.text_encoder):
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(peer.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(peer.text_encoder),
        unet_lora_adapter_metadata=peer.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=peer.text_encoder.peft_config["default"].to_dict())
    ours = sd_lora.load_pipeline("tiny")
    info = sd_lora.attach(ours).load(tmp_path / "pytorch_lora_weights.safetensors", name="p")
    assert info.format == "diffusers"
    torch.testing.assert_close(unet_out(ours), unet_out(peer), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(te_out(ours), te_out(peer), atol=1e-5, rtol=1e-5)


def test_per_module_alphas_in_kohya_files_are_exact(tmp_path):
    """kohya files whose alphas differ per module: we apply each module's own alpha (a known diffusers bug)."""
    w, ref = _ours(tmp_path, "full", alphas="varied")
    sd_lora.save_adapter(w, tmp_path / "a.safetensors", dtype=torch.float32)
    ours = sd_lora.load_pipeline("tiny")
    sd_lora.attach(ours).load(tmp_path / "a.safetensors")
    torch.testing.assert_close(unet_out(ours), unet_out(ref), atol=1e-5, rtol=1e-5)
    # the same tensors with every alpha equal to the rank give a different result: the alphas really matter
    flat = sd_lora.load_pipeline("tiny")
    sd_lora.attach(flat).load(sd_lora.AdapterWeights({k: sd_lora.LoRAModule(m.down, m.up, None)
                                                      for k, m in w.modules.items()}), name="flat")
    assert not torch.allclose(unet_out(flat), unet_out(ref), atol=1e-3)


def test_kohya_file_with_ldm_unet_names(tmp_path):
    """Some SD1.5 files name UNet modules by original-SD blocks (input_blocks_1_1_...); the config translates them."""
    w, ref = _ours(tmp_path, "full", alphas="varied")
    config = dict(ref.unet.config)
    t = {}
    for name, m in w.modules.items():
        part, path = name.split(".", 1)
        stem = ("lora_unet_" + ldm.unet_path_to_ldm(path, config).replace(".", "_") if part == "unet"
                else "lora_te_text_model_" + path.replace(".", "_"))
        t.update({f"{stem}.lora_down.weight": m.down, f"{stem}.lora_up.weight": m.up,
                  f"{stem}.alpha": torch.tensor(m.alpha_value)})
    assert any(k.startswith("lora_unet_input_blocks_1_1_") for k in t)
    save_file(t, tmp_path / "ldm.safetensors")
    ours = sd_lora.load_pipeline("tiny")
    sd_lora.attach(ours).load(tmp_path / "ldm.safetensors")
    torch.testing.assert_close(unet_out(ours), unet_out(ref), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(te_out(ours), te_out(ref), atol=1e-5, rtol=1e-5)


def test_attention_processor_era_diffusers_files(tmp_path):
    """diffusers 0.14-0.2x wrote "<attn>.processor.to_q_lora.down.weight" (UNet) and "<attn>.to_q_lora.down.weight"
    (CLIP, whose projections are q_proj ... out_proj), without alphas: we read them as diffusers' loader does."""
    w, ref = _ours(tmp_path, "attn", alphas="none")
    old = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out",
           "q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}
    t = {}
    for name, m in w.modules.items():
        part, path = name.split(".", 1)
        projection = "to_out.0" if path.endswith(".to_out.0") else path.rpartition(".")[2]
        attn = path[: -len(projection) - 1]
        stem = (f"unet.{attn}.processor.{old[projection]}_lora" if part == "unet"
                else f"text_encoder.text_model.{attn}.{old[projection]}_lora")
        t.update({f"{stem}.down.weight": m.down, f"{stem}.up.weight": m.up})
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight" in t
    save_file(t, tmp_path / "old.safetensors")
    ours = sd_lora.load_pipeline("tiny")
    info = sd_lora.attach(ours).load(tmp_path / "old.safetensors")
    assert info.format == "diffusers" and info.modules == {p: w.count(p) for p in ("unet", "text_encoder")}
    torch.testing.assert_close(unet_out(ours), unet_out(ref), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(te_out(ours), te_out(ref), atol=1e-5, rtol=1e-5)
    peer = sd_lora.load_pipeline("tiny")
    peer.load_lora_weights(str(tmp_path), weight_name="old.safetensors", adapter_name="old")
    torch.testing.assert_close(unet_out(peer), unet_out(ours), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(te_out(peer), te_out(ours), atol=1e-5, rtol=1e-5)
