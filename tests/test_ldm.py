"""sd_lora.formats.ldm: diffusers <-> original-SD (LDM) names, checked against diffusers itself and SD1.5's layout."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file

import sd_lora
from sd_lora.formats import ldm

TINY_UNET = UNet2DConditionModel.load_config(sd_lora.pipeline.tiny_dir() / "unet")
TINY_VAE = AutoencoderKL.load_config(sd_lora.pipeline.tiny_dir() / "vae")

# UNet layouts that differ from the tiny one in every way the names depend on (channels kept tiny).
UNET_VARIANTS = {
    "tiny": {},
    "sd15_layout": {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 2,
                    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3},
    "no_attention_first_linear_proj": {"block_out_channels": [32, 64, 64], "layers_per_block": 2,
                                       "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                                       "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                                       "use_linear_projection": True},
    "sdxl_layout": {"block_out_channels": [32, 64, 64], "layers_per_block": 2,
                    "transformer_layers_per_block": [1, 2, 2],
                    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                    "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                    "projection_class_embeddings_input_dim": 64 + 6 * 8, "use_linear_projection": True},
}
VAE_VARIANTS = {"tiny": {}, "three_blocks": {"block_out_channels": [16, 32, 32], "layers_per_block": 2,
                                             "down_block_types": ["DownEncoderBlock2D"] * 3,
                                             "up_block_types": ["UpDecoderBlock2D"] * 3}}

SD15_UNET = {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 768,
             "attention_head_dim": 8, "norm_num_groups": 32,
             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
SD15_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}


def build(cls, base, overrides, device="cpu"):
    torch.manual_seed(0)
    with torch.device(device):
        return cls.from_config({**base, **overrides})


@pytest.fixture(scope="module")
def tiny():
    """One tiny pipeline for the module: nothing here mutates it."""
    return sd_lora.load_pipeline("tiny")


def assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k, value in a.items():
        assert torch.equal(value, b[k]), k


@pytest.mark.parametrize("variant", UNET_VARIANTS)
def test_unet_round_trip_and_agrees_with_diffusers_converter(variant):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = build(UNet2DConditionModel, TINY_UNET, UNET_VARIANTS[variant])
    sd = unet.state_dict()
    ours = ldm.unet_state_dict_to_ldm(sd, unet.config)
    assert len(ours) == len(sd)  # one LDM name per parameter
    assert_same(ldm.unet_state_dict_from_ldm(ours, unet.config), sd)
    theirs = convert_ldm_unet_checkpoint({ldm.UNET_PREFIX + k: v for k, v in ours.items()}, dict(unet.config))
    assert_same(theirs, sd)


@pytest.mark.parametrize("variant", VAE_VARIANTS)
def test_vae_round_trip_and_agrees_with_diffusers_converter(variant):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae = build(AutoencoderKL, TINY_VAE, VAE_VARIANTS[variant])
    sd = vae.state_dict()
    ours = ldm.vae_state_dict_to_ldm(sd, vae.config)
    assert len(ours) == len(sd)
    assert ours["decoder.mid.attn_1.q.weight"].shape == (*sd["decoder.mid_block.attentions.0.to_q.weight"].shape, 1, 1)
    n = len(vae.config.block_out_channels)
    assert f"decoder.up.{n - 1}.upsample.conv.weight" in ours and "decoder.up.0.upsample.conv.weight" not in ours
    assert_same(ldm.vae_state_dict_from_ldm(ours, vae.config), sd)
    assert_same(convert_ldm_vae_checkpoint({ldm.VAE_PREFIX + k: v for k, v in ours.items()}, dict(vae.config)), sd)


def test_text_encoder_keys_carry_text_model_and_load_back(tiny):
    sd = tiny.text_encoder.state_dict()
    ours = ldm.text_encoder_state_dict_to_ldm(sd)
    assert all(k.startswith("text_model.") for k in ours)
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in ours
    back = ldm.text_encoder_state_dict_from_ldm({**ours, "text_model.embeddings.position_ids": torch.arange(77)[None]})
    tiny.text_encoder.load_state_dict(back, strict=True)  # fits the installed transformers as it is
    assert_same(back, sd)
    assert set(ldm.text_encoder_state_dict_from_ldm(ours, has_text_model_prefix=True)) == set(ours)
    assert set(ldm.text_encoder_state_dict_from_ldm(ours, has_text_model_prefix=False)) == {
        k.removeprefix("text_model.") for k in ours}
    assert ldm.text_encoder_state_dict_to_ldm(ours) == ours  # a transformers-4 style dict passes unchanged


def test_sd15_known_paths():
    known = {
        "input_blocks.1.1.transformer_blocks.0.attn2.to_q": "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q",
        "middle_block.1.proj_in": "mid_block.attentions.0.proj_in",
        "output_blocks.11.1.proj_out": "up_blocks.3.attentions.2.proj_out",
        "input_blocks.0.0.weight": "conv_in.weight",
        "input_blocks.3.0.op.weight": "down_blocks.0.downsamplers.0.conv.weight",
        "input_blocks.4.0.skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
        "input_blocks.11.0.emb_layers.1": "down_blocks.3.resnets.1.time_emb_proj",
        "middle_block.2.out_layers.3.bias": "mid_block.resnets.1.conv2.bias",
        "output_blocks.2.1.conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks.5.2.conv.weight": "up_blocks.1.upsamplers.0.conv.weight",
        "output_blocks.8.0.in_layers.2": "up_blocks.2.resnets.2.conv1",
        "output_blocks.9.1.transformer_blocks.0.ff.net.0.proj": "up_blocks.3.attentions.0.transformer_blocks.0.ff.net.0.proj",
        "time_embed.0.weight": "time_embedding.linear_1.weight", "time_embed.2": "time_embedding.linear_2",
        "out.0.bias": "conv_norm_out.bias", "out.2": "conv_out",
    }
    for ldm_path, diffusers_path in known.items():
        assert ldm.unet_path_from_ldm(ldm_path, SD15_UNET) == diffusers_path
        assert ldm.unet_path_to_ldm(diffusers_path, SD15_UNET) == ldm_path
    assert ("input_blocks.7.1", "down_blocks.2.attentions.0") in ldm.ldm_unet_prefixes(SD15_UNET)


def test_sd15_full_key_sets_have_the_real_files_layout():
    """Built on the meta device: SD1.5's real key layout without allocating 3 GB."""
    unet = ldm.unet_state_dict_to_ldm(build(UNet2DConditionModel, TINY_UNET, SD15_UNET, "meta").state_dict(), SD15_UNET)
    vae = ldm.vae_state_dict_to_ldm(build(AutoencoderKL, TINY_VAE, SD15_VAE, "meta").state_dict(), SD15_VAE)
    assert (len(unet), len(vae)) == (686, 248)  # the counts in v1-5-pruned-emaonly.safetensors
    blocks = {".".join(k.split(".")[:2]) for k in unet if k.startswith(("input_blocks", "output_blocks"))}
    assert blocks == {f"input_blocks.{i}" for i in range(12)} | {f"output_blocks.{i}" for i in range(12)}
    with_attention = {int(k.split(".")[1]) for k in unet if k.startswith("input_blocks") and ".1.proj_in." in k}
    assert with_attention == {1, 2, 4, 5, 7, 8}
    assert {k for k in unet if k.startswith("output_blocks") and k.endswith(".conv.weight")} == {
        "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight"}
    for key in ("decoder.up.1.block.0.nin_shortcut.weight", "encoder.down.2.downsample.conv.weight",
                "encoder.mid.attn_1.proj_out.weight", "decoder.norm_out.bias", "post_quant_conv.weight"):
        assert key in vae
    assert not any(k.startswith(("encoder.down.3.downsample", "decoder.up.0.upsample")) for k in vae)


def test_unmapped_paths_raise_clear_errors():
    with pytest.raises(KeyError, match="in_layers.1"):
        ldm.unet_path_from_ldm("input_blocks.1.0.in_layers.1", SD15_UNET)  # the SiLU: nothing to map to
    with pytest.raises(KeyError, match="input_blocks.12"):
        ldm.unet_path_from_ldm("input_blocks.12.0.op", SD15_UNET)
    with pytest.raises(KeyError, match="down_blocks.3.downsamplers"):
        ldm.unet_path_to_ldm("down_blocks.3.downsamplers.0.conv", SD15_UNET)  # the last level has no downsampler
    with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
        ldm.unet_path_from_ldm("out.2", {**SD15_UNET, "down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4})


def test_single_file_to_parts_round_trip_ignores_non_model_keys(tiny):
    parts = (tiny.unet.state_dict(), tiny.vae.state_dict(), tiny.text_encoder.state_dict())
    sd = ldm.pipeline_to_single_file(*parts, tiny.unet.config, tiny.vae.config)
    sd.update({"alphas_cumprod": torch.ones(3), "model_ema.decay": torch.tensor(0.9999),
               "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]})
    for got, want in zip(ldm.single_file_to_parts(sd, tiny.unet.config, tiny.vae.config), parts):
        assert_same(got, want)
    with pytest.raises(ValueError, match="model.diffusion_model"):
        ldm.single_file_to_parts({"first_stage_model.quant_conv.weight": torch.ones(1)}, TINY_UNET, TINY_VAE)


def test_diffusers_from_single_file_reads_our_checkpoint(tiny, tmp_path):
    """The peer: diffusers' own single-file loader, given only configs, gets every tensor and the same image."""
    config_dir = tmp_path / "config"
    tiny.save_pretrained(config_dir)
    for weights in [*config_dir.rglob("*.safetensors"), *config_dir.rglob("*.bin")]:
        weights.unlink()  # configs only: the weights must come from our file
    parts = {name: getattr(tiny, name).state_dict() for name in ("unet", "vae", "text_encoder")}
    sd = ldm.pipeline_to_single_file(parts["unet"], parts["vae"], parts["text_encoder"], tiny.unet.config,
                                     tiny.vae.config)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")

    loaded = StableDiffusionPipeline.from_single_file(str(tmp_path / "model.safetensors"), config=str(config_dir),
                                                      safety_checker=None)
    for name, want in parts.items():
        assert_same(getattr(loaded, name).state_dict(), want)
    loaded.set_progress_bar_config(disable=True)
    images = [p("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
              for p in (tiny, loaded)]
    np.testing.assert_array_equal(*images)
