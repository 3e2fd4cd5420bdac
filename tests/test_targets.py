"""sd_lora.targets: presets on the real SD1.5 architecture, and kohya key naming."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from sd_lora.targets import kohya_stem, module_table, normalize, preset_paths, split_kohya_key, stem_to_path

SD15_UNET = {"sample_size": 64, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
             "cross_attention_dim": 768, "attention_head_dim": 8,
             "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
             "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}


@pytest.fixture(scope="module")
def sd15():
    with torch.device("meta"):  # names and shapes only: no 3 GB of weights
        return UNet2DConditionModel(**SD15_UNET), CLIPTextModel(CLIPTextConfig(**CLIP_L))


def test_kohya_default_set_is_192_unet_and_72_text_encoder_modules(sd15):
    unet, te = sd15
    assert len(preset_paths(unet, "unet", "full")) == 192
    assert len(preset_paths(te, "text_encoder", "full")) == 72


def test_cross_attn_preset(sd15):
    unet, te = sd15
    paths = preset_paths(unet, "unet", "cross-attn")
    assert len(paths) == 16 * 4 and all(".attn2." in p for p in paths)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0" in paths
    assert len(preset_paths(te, "text_encoder", "cross-attn")) == 48
    assert len(preset_paths(unet, "unet", "attn")) == 128


def test_unknown_preset_is_an_error(sd15):
    with pytest.raises(ValueError, match="unknown target preset 'nope'"):
        preset_paths(sd15[0], "unet", "nope")


@pytest.mark.parametrize("key,expected", [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q.lora_down.weight",
     ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q", "lora_down.weight")),
    ("lora_unet_mid_block_attentions_0_proj_in.alpha", ("unet", "mid_block.attentions.0.proj_in", "alpha")),
    ("lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn1_to_out_0.lora_up.weight",
     ("unet", "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0", "lora_up.weight")),
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj.alpha",
     ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj", "alpha")),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
     ("text_encoder", "encoder.layers.0.self_attn.q_proj", "lora_up.weight")),
    ("lora_te2_text_model_encoder_layers_11_mlp_fc1.alpha", ("text_encoder_2", "encoder.layers.11.mlp.fc1", "alpha")),
    ("lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.alpha",
     ("unet", "input_blocks.1.1.transformer_blocks.0.attn2.to_k", "alpha")),
])
def test_split_kohya_key(key, expected):
    assert split_kohya_key(key) == expected


def test_text_encoder_stems_always_carry_text_model():
    assert kohya_stem("text_encoder", "encoder.layers.0.self_attn.q_proj") == \
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert kohya_stem("text_encoder", "text_model.encoder.layers.11.mlp.fc1") == "lora_te_text_model_encoder_layers_11_mlp_fc1"
    assert kohya_stem("unet", "mid_block.attentions.0.proj_in") == "lora_unet_mid_block_attentions_0_proj_in"


def test_every_sd15_module_round_trips_through_kohya_naming(sd15):
    unet, te = sd15
    for part, model in (("unet", unet), ("text_encoder", te)):
        table = module_table(model)
        for path in preset_paths(model, part, "full"):
            stem = kohya_stem(part, path)
            back = split_kohya_key(stem + ".alpha")
            assert back[:2] == (part, path)
            assert table[normalize(back[1])] in (path, "text_model." + path)
    assert stem_to_path("conv_norm_out") == "conv_norm_out"
