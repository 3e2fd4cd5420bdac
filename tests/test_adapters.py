"""sd_lora.Adapters on the tiny pipeline: loading, blending, routing, merging, removal, and failed loads."""

import pytest
import torch
from helpers import generate, random_adapter, te_out, unet_out
from safetensors.torch import save_file

import sd_lora
from sd_lora import AdapterError


def _state(pipe):
    return {k: v.clone() for part in ("unet", "text_encoder") for k, v in getattr(pipe, part).state_dict().items()}


def _loaded(pipe, tmp_path, mode="auto", n=2):
    lora = sd_lora.attach(pipe, mode=mode)
    fresh = sd_lora.load_pipeline("tiny")
    for i, name in enumerate(["mozart", "ink", "gold"][:n]):
        sd_lora.save_adapter(random_adapter(fresh, seed=i), tmp_path / f"{name}.safetensors", dtype=torch.float32)
        lora.load(tmp_path / f"{name}.safetensors")
    return lora


def test_adapter_changes_output_and_weight_zero_is_the_base(pipe, tmp_path):
    base_u, base_t = unet_out(pipe), te_out(pipe)
    lora = _loaded(pipe, tmp_path, n=1)
    assert not torch.allclose(unet_out(pipe), base_u, atol=1e-3)
    lora.set_weights({"mozart": 0.0})
    torch.testing.assert_close(unet_out(pipe), base_u, atol=0, rtol=0)
    torch.testing.assert_close(te_out(pipe), base_t, atol=0, rtol=0)


@pytest.mark.parametrize("weights", [{"mozart": 0.8, "ink": 0.3}, {"mozart": -1.0, "ink": 2.5},
                                     {"mozart": {"unet": 0.5, "text_encoder": 0.2}, "ink": 1.0}])
def test_auto_mode_equals_live_mode(tmp_path, weights):
    auto_pipe, live_pipe = sd_lora.load_pipeline("tiny"), sd_lora.load_pipeline("tiny")
    auto, live = _loaded(auto_pipe, tmp_path, "auto"), _loaded(live_pipe, tmp_path, "live")
    auto.set_weights(weights)
    live.set_weights(weights)
    torch.testing.assert_close(unet_out(auto_pipe), unet_out(live_pipe), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(te_out(auto_pipe), te_out(live_pipe), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(generate(auto_pipe), generate(live_pipe), atol=1e-4, rtol=1e-4)


def test_blend_is_the_sum_of_its_parts(pipe, tmp_path):
    """Linearity: (base+A+B) - base == (base+A - base) + (base+B - base) at the layer level shows in outputs."""
    lora = _loaded(pipe, tmp_path, mode="live")
    layer = next(iter(lora.layers["unet"].values()))
    x = torch.randn(2, 5, layer.base.in_features) if not layer.is_conv else torch.randn(2, layer.base.in_channels, 4, 4)
    outs = {}
    for w in ({"mozart": 0.6, "ink": -0.4}, {"mozart": 0.6}, {"ink": -0.4}, {}):
        lora.set_weights(w)
        outs[tuple(w)] = layer(x)
    base = outs[()]
    torch.testing.assert_close(outs[("mozart", "ink")] - base,
                               (outs[("mozart",)] - base) + (outs[("ink",)] - base), atol=1e-5, rtol=1e-4)


def test_merge_unmerge_exact(pipe, tmp_path):
    original = _state(pipe)
    lora = _loaded(pipe, tmp_path, mode="live")
    lora.set_weights({"mozart": 0.7, "ink": 0.4})
    live = unet_out(pipe)
    lora.merge()
    torch.testing.assert_close(unet_out(pipe), live, atol=1e-5, rtol=1e-5)
    lora.set_weights({"mozart": 0.2})  # re-folds from the saved copy
    lora.merge()  # merging twice is harmless
    lora.set_weights({"mozart": 0.7, "ink": 0.4})
    torch.testing.assert_close(unet_out(pipe), live, atol=1e-5, rtol=1e-5)
    lora.unmerge()
    lora.detach()
    after = _state(pipe)
    assert all(torch.equal(original[k], after[k]) for k in original)


def test_scaled_context_leaves_no_stale_scale(pipe, tmp_path):
    lora = _loaded(pipe, tmp_path, n=1)
    before = unet_out(pipe)
    base_pipe = sd_lora.load_pipeline("tiny")
    with lora.scaled(0.0):
        torch.testing.assert_close(unet_out(pipe), unet_out(base_pipe), atol=0, rtol=0)
    torch.testing.assert_close(unet_out(pipe), before, atol=0, rtol=0)
    assert lora.get_weights()["mozart"] == {"unet": 1.0, "text_encoder": 1.0}


def test_route_gives_each_image_its_adapter(tmp_path):
    pipe = sd_lora.load_pipeline("tiny")
    lora = _loaded(pipe, tmp_path)
    lora.set_weights({"mozart": 0.8, "ink": 0.5})
    prompts = ["a red circle"] * 3
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with lora.route(["mozart", "ink", None]):
        routed = generate(pipe, prompts, latents=noise.repeat(3, 1, 1, 1))
    singles = []
    for w in ({"mozart": 0.8}, {"ink": 0.5}, {}):
        lora.set_weights(w)
        singles.append(generate(pipe, prompts[:1], latents=noise))
    for i in range(3):
        torch.testing.assert_close(torch.from_numpy(routed[i]), torch.from_numpy(singles[i][0]), atol=2e-4, rtol=1e-3)
    assert all(b.route is None for b in lora.blends.values())


def test_route_entry_with_per_part_weights(pipe, tmp_path):
    lora = _loaded(pipe, tmp_path, mode="live")
    lora.route([{"mozart": {"unet": 0.5, "text_encoder": 0.25}}, None])
    assert lora.blends["unet"].route == [{"mozart": 0.5}, {}]
    assert lora.blends["text_encoder"].route == [{"mozart": 0.25}, {}]
    lora.route(None)


def test_remove_and_detach_restore_the_pipeline(pipe, tmp_path):
    base = unet_out(pipe)
    original = _state(pipe)
    lora = _loaded(pipe, tmp_path)
    only_mozart = sd_lora.load_pipeline("tiny")
    ref = _loaded(only_mozart, tmp_path, n=1)
    lora.remove("ink")
    torch.testing.assert_close(unet_out(pipe), unet_out(only_mozart), atol=1e-6, rtol=1e-6)
    assert lora.names == ["mozart"] and ref.names == ["mozart"]
    lora.remove("mozart")
    assert not any(lora.layers.values()) or not any(lora.layers[p] for p in lora.layers)
    torch.testing.assert_close(unet_out(pipe), base, atol=0, rtol=0)
    lora.detach()
    assert all(torch.equal(original[k], v) for k, v in _state(pipe).items())
    assert not any(isinstance(m, sd_lora.lora.LoRALayer) for m in pipe.unet.modules())


def test_unet_only_pipeline(tmp_path):
    pipe = sd_lora.load_pipeline("tiny")
    pipe.text_encoder = None
    lora = sd_lora.attach(pipe)
    sd_lora.save_adapter(random_adapter(sd_lora.load_pipeline("tiny")), tmp_path / "a.safetensors")
    info = lora.load(tmp_path / "a.safetensors")
    assert info.modules == {"unet": 84}


def test_save_reload_gives_same_outputs(pipe, tmp_path):
    lora = _loaded(pipe, tmp_path, n=1)
    lora.set_weights({"mozart": 0.9})
    expect = unet_out(pipe), te_out(pipe)
    lora.save("mozart", tmp_path / "again.safetensors", dtype=torch.float32)
    other = sd_lora.load_pipeline("tiny")
    sd_lora.attach(other).load(tmp_path / "again.safetensors", weight=0.9)
    torch.testing.assert_close(unet_out(other), expect[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(te_out(other), expect[1], atol=1e-6, rtol=1e-6)


def test_names_with_dots_as_shared_files_have_them(pipe, tmp_path):
    """"add_detail_v1.5.safetensors" loads under its stem (torch refuses dots in parameter names, so sd_lora escapes
    them), and does not collide with a name that looks like the escaped one."""
    fresh = sd_lora.load_pipeline("tiny")
    sd_lora.save_adapter(random_adapter(fresh, seed=0), tmp_path / "add_detail_v1.5.safetensors", dtype=torch.float32)
    sd_lora.save_adapter(random_adapter(fresh, seed=1), tmp_path / "other.safetensors", dtype=torch.float32)
    base = unet_out(pipe)
    lora = sd_lora.attach(pipe)
    lora.load(tmp_path / "add_detail_v1.5.safetensors")
    lora.load(tmp_path / "other.safetensors", name="add_detail_v1%2E5", weight=0.0)
    assert lora.names == ["add_detail_v1.5", "add_detail_v1%2E5"]
    dotted = unet_out(pipe)
    lora.set_weights({"add_detail_v1.5": 0.0, "add_detail_v1%2E5": 1.0})
    assert not torch.allclose(unet_out(pipe), dotted, atol=1e-4)  # two adapters, not one under two names
    lora.save("add_detail_v1.5", tmp_path / "again.safetensors", dtype=torch.float32)
    lora.remove("add_detail_v1.5")
    lora.remove("add_detail_v1%2E5")
    torch.testing.assert_close(unet_out(pipe), base, atol=0, rtol=0)
    other = sd_lora.load_pipeline("tiny")
    sd_lora.attach(other).load(tmp_path / "again.safetensors", name="v.1.5.")
    torch.testing.assert_close(unet_out(other), dotted, atol=1e-6, rtol=1e-6)


# ---- failed loads leave the pipeline exactly as it was ----------------------------------------------------------
def _assert_untouched(pipe, lora, original, expect_names):
    assert lora.names == expect_names
    lora.detach()
    assert all(torch.equal(original[k], v) for k, v in _state(pipe).items())


def test_sdxl_adapter_into_sd1_is_refused_untouched(pipe, tmp_path):
    lora = sd_lora.attach(pipe)
    original = _state(pipe)
    save_file({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q.lora_down.weight": torch.ones(4, 640),
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q.lora_up.weight": torch.ones(640, 4),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(4, 1280),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(5120, 4)},
              tmp_path / "xl.safetensors", metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(AdapterError, match=r"xl\.safetensors: this adapter is for SDXL but the pipeline is "
                                           r"Stable Diffusion 1\.x"):
        lora.load(tmp_path / "xl.safetensors")
    _assert_untouched(pipe, lora, original, [])


def test_unmatched_keys_are_listed_and_nothing_changes(pipe, tmp_path):
    lora = sd_lora.attach(pipe)
    original = _state(pipe)
    good = random_adapter(pipe, preset="cross-attn")
    t = {f"lora_unet_{k[5:].replace('.', '_')}.lora_down.weight": m.down for k, m in good.modules.items()
         if k.startswith("unet.")}
    t.update({f"lora_unet_{k[5:].replace('.', '_')}.lora_up.weight": m.up for k, m in good.modules.items()
              if k.startswith("unet.")})
    t["lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"] = torch.ones(4, 32, 1, 1)
    t["lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight"] = torch.ones(32, 4, 1, 1)
    save_file(t, tmp_path / "odd.safetensors")
    with pytest.raises(AdapterError, match=r"odd\.safetensors: 1 of \d+ LoRA modules match no module of this model, "
                                           r"e\.g\. unet\.down_blocks\.7\.attentions\.0\.proj_in"):
        lora.load(tmp_path / "odd.safetensors")
    _assert_untouched(pipe, lora, original, [])


def test_shape_mismatch_names_module(pipe, tmp_path):
    lora = sd_lora.attach(pipe)
    original = _state(pipe)
    save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.ones(4, 63, 1, 1),
               "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.ones(64, 4, 1, 1)},
              tmp_path / "shape.safetensors")
    with pytest.raises(AdapterError, match=r"shape\.safetensors: unet\.mid_block\.attentions\.0\.proj_in: shape "
                                           r"mismatch"):
        lora.load(tmp_path / "shape.safetensors")
    _assert_untouched(pipe, lora, original, [])


def test_duplicate_name_and_bad_file_keep_loaded_adapters(pipe, tmp_path):
    lora = _loaded(pipe, tmp_path, n=1)
    lora.set_weights({"mozart": 0.5})
    before = unet_out(pipe)
    with pytest.raises(AdapterError, match=r"mozart\.safetensors: an adapter named 'mozart' is already loaded"):
        lora.load(tmp_path / "mozart.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(AdapterError, match="bad.safetensors"):
        lora.load(tmp_path / "bad.safetensors")
    torch.testing.assert_close(unet_out(pipe), before, atol=0, rtol=0)


def test_bad_weights_requests(pipe, tmp_path):
    lora = _loaded(pipe, tmp_path, n=1)
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        lora.set_weights({"nope": 1.0})
    with pytest.raises(ValueError, match="unknown part"):
        lora.set_weights({"mozart": {"vae": 1.0}})
    with pytest.raises(TypeError, match="route entries"):
        lora.route([3])
    lora.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        lora.route(["mozart"])


def test_add_trainable_refuses_a_preset_that_matches_no_unet_module_and_changes_nothing():
    from diffusers import UNet2DConditionModel

    pipe = sd_lora.load_pipeline("tiny")
    pipe.unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32,), down_block_types=("DownBlock2D",),
                                     up_block_types=("UpBlock2D",), mid_block_type=None, layers_per_block=1,
                                     cross_attention_dim=64, norm_num_groups=8)  # no attention anywhere
    lora = sd_lora.attach(pipe)
    with pytest.raises(AdapterError, match="'cross-attn' preset matches no module of this UNet"):
        lora.add_trainable("style")
    assert lora.names == [] and lora.trainable_parameters() == []
    with pytest.raises(AdapterError, match="'full' preset matches no module"):  # kohya's set is attention-only too
        lora.add_trainable("style", preset="full")


def test_two_names_for_one_module_fail_before_anything_changes(pipe, tmp_path):
    """Two keys that resolve to one module used to wrap the layer and add the first before failing on the second:
    the load failed, yet the layer kept the half-loaded adapter and its name could never be loaded again."""
    lora = sd_lora.attach(pipe)
    original = _state(pipe)
    pair = {"lora_A.weight": torch.ones(2, 64, 1, 1) * 0.01, "lora_B.weight": torch.ones(64, 2, 1, 1) * 0.01}
    save_file({f"unet.mid_block.{a}.proj_in.{k}": t.clone() for a in ("attentions.0", "attentions_0")
               for k, t in pair.items()},
              tmp_path / "twice.safetensors")
    with pytest.raises(AdapterError, match=r"twice\.safetensors: unet\.mid_block\.attentions\.0\.proj_in and "
                                           r"unet\.mid_block\.attentions_0\.proj_in name the same module"):
        lora.load(tmp_path / "twice.safetensors")
    assert lora.layers["unet"] == {}
    _assert_untouched(pipe, lora, original, [])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_and_change_nothing(pipe, tmp_path, bad):
    """A NaN or Inf weight turns every image black; it is an error, and the blend stays as it was."""
    lora = _loaded(pipe, tmp_path, n=1)
    lora.set_weights({"mozart": 0.5})
    before = unet_out(pipe)
    for attempt in (lambda: lora.set_weights({"mozart": bad}), lambda: lora.set_weights({"mozart": {"unet": bad}}),
                    lambda: lora.route(["mozart", {"mozart": bad}]),
                    lambda: lora.load(tmp_path / "mozart.safetensors", name="again", weight=bad)):
        with pytest.raises(ValueError, match="finite number"):
            attempt()
    with pytest.raises(ValueError, match="finite number"), lora.scaled(bad):
        pass
    assert lora.names == ["mozart"] and lora.get_weights() == {"mozart": {"unet": 0.5, "text_encoder": 0.5}}
    torch.testing.assert_close(unet_out(pipe), before, atol=0, rtol=0)


def test_adapter_weights_built_in_code_are_validated_like_a_file(pipe):
    lora = sd_lora.attach(pipe)
    original = _state(pipe)
    w = random_adapter(pipe, preset="cross-attn")
    next(iter(w.modules.values())).up[0, 0] = float("nan")
    with pytest.raises(AdapterError, match="contains NaN or Inf"):
        lora.load(w, name="nan")
    _assert_untouched(pipe, lora, original, [])
