"""sd_lora.merge: blend, resize, extract, and folding a blend into checkpoints that diffusers reads back."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from helpers import random_adapter, te_out, unet_out, with_conv_module
from safetensors import safe_open

import sd_lora
from sd_lora import AdapterError, lowrank, merge
from sd_lora.checkpoint import read_header, unet_layout_from_ldm, write_single_file
from sd_lora.formats import ldm

WEIGHTS = {"a": 0.7, "b": -0.4}


@pytest.fixture(scope="module")
def adapters():
    """Two adapters that overlap on the attention modules: a (kohya full set, rank 4, alphas differing per module)
    and b (attention only, rank 8, alpha 3)."""
    tiny = sd_lora.load_pipeline("tiny")
    return {"a": random_adapter(tiny, "full", rank=4, seed=1), "b": random_adapter(tiny, "attn", rank=8, seed=2,
                                                                                   alphas=3.0)}


@pytest.fixture(scope="module")
def items(adapters):
    return [(adapters[n], w) for n, w in WEIGHTS.items()]


@pytest.fixture(scope="module")
def live(adapters):
    """The reference: both adapters loaded live at WEIGHTS, and its UNet and text-encoder outputs."""
    pipe = sd_lora.load_pipeline("tiny")
    lora = sd_lora.attach(pipe, mode="live")
    for name, w in adapters.items():
        lora.load(w, name=name)
    lora.set_weights(WEIGHTS)
    return unet_out(pipe), te_out(pipe)


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    """A local tiny folder written by save_pretrained, weights removed: from_single_file must take them from the file."""
    folder = tmp_path_factory.mktemp("config")
    sd_lora.load_pipeline("tiny").save_pretrained(folder)
    for f in [*folder.rglob("*.safetensors"), *folder.rglob("*.bin")]:
        f.unlink()
    return folder


@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
    """The tiny model as someone else's single file: LDM keys, extra non-model tensors, its own metadata."""
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    write_single_file(sd_lora.load_pipeline("tiny"), path, None, {"note": "from elsewhere"})
    return path


def assert_outputs(pipe, live, atol=1e-4):
    torch.testing.assert_close(unet_out(pipe), live[0], atol=atol, rtol=atol)
    torch.testing.assert_close(te_out(pipe), live[1], atol=atol, rtol=atol)


def from_single_file(path, config_dir):
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config_dir), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- merging into checkpoints ---------------------------------------------------------------------------------------
def test_merged_single_file_gives_the_live_blend_in_diffusers_own_loader(items, live, config_dir, tmp_path):
    out = merge.merge_checkpoint("tiny", items, tmp_path / "merged.safetensors")
    keys = set(read_header(out)[0]) - {"__metadata__"}
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert_outputs(from_single_file(out, config_dir), live)
    assert_outputs(sd_lora.load_pipeline(out), live)  # no config needed: our files embed theirs


def test_merged_diffusers_folder_gives_the_live_blend(items, live, tmp_path):
    out = merge.merge_checkpoint("tiny", items, tmp_path / "merged")
    assert (out / "model_index.json").is_file()
    assert_outputs(sd_lora.load_pipeline(out), live)
    merge.merge_checkpoint("tiny", items, out)  # replacing an existing pipeline folder is allowed
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a diffusers pipeline folder"):
        merge.merge_checkpoint("tiny", items, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_diffusers_folder_is_merged_without_loading_it(items, live, tmp_path):
    src = tmp_path / "src"
    sd_lora.load_pipeline("tiny").save_pretrained(src)
    assert merge.is_plain_folder(src)
    out = merge.merge_checkpoint(src, items, tmp_path / "merged")
    assert_outputs(sd_lora.load_pipeline(out), live)
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert (out / vae).read_bytes() == (src / vae).read_bytes()
    unet = "unet/diffusion_pytorch_model.safetensors"
    (_, before), (_, after) = _raw(src / unet), _raw(out / unet)
    assert sum(before[k] != after[k] for k in before) == merge.blend_exact(items).count("unet")
    wrong = random_adapter(sd_lora.load_pipeline("tiny"), "attn", rank=2)
    wrong.modules["unet.down_blocks.9.attentions.0.proj_in"] = wrong.modules.popitem()[1]
    with pytest.raises(AdapterError, match="match no weight"):
        merge.merge_checkpoint(src, [(wrong, 1.0)], tmp_path / "bad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "src"]


def test_folder_variants_are_merged_too(items, live, tmp_path):
    """A hub snapshot keeps fp16 variants beside the fp32 weights; loading the merge with variant="fp16" must not
    give the unmerged base."""
    src = tmp_path / "src"
    sd_lora.load_pipeline("tiny").to(torch.float16).save_pretrained(src, variant="fp16")
    sd_lora.load_pipeline("tiny").save_pretrained(src)  # second, so that the configs say float32
    assert (src / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file() and merge.is_plain_folder(src)
    out = merge.merge_checkpoint(src, items, tmp_path / "merged")
    variant = StableDiffusionPipeline.from_pretrained(out, variant="fp16", dtype=torch.float32,
                                                      safety_checker=None)
    assert_outputs(variant, live, atol=2e-2)  # fp16 storage
    assert_outputs(sd_lora.load_pipeline(out), live)
    effect = (live[0] - unet_out(sd_lora.load_pipeline("tiny"))).abs().max()
    assert (unet_out(variant) - live[0]).abs().max() < 0.1 * effect


def _raw(path):
    header, start = read_header(path)
    data = path.read_bytes()
    return header, {k: data[start + v["data_offsets"][0]:start + v["data_offsets"][1]] for k, v in header.items()
                    if k != "__metadata__"}


def test_single_file_model_is_merged_in_its_own_key_space(items, live, base_file, config_dir, tmp_path):
    out = merge.merge_single_file(base_file, items, tmp_path / "merged.safetensors")
    (src_header, src), (out_header, got) = _raw(base_file), _raw(out)
    assert set(src) == set(got)
    changed = {k for k in src if src[k] != got[k]}
    assert len(changed) == len(merge.blend_exact(items).modules)
    assert all(k.endswith(".weight") and k.startswith(("model.diffusion_model.", "cond_stage_model.")) for k in changed)
    assert all(out_header[k] == {**src_header[k], "data_offsets": out_header[k]["data_offsets"]} for k in src)
    assert out_header["__metadata__"]["note"] == "from elsewhere"
    assert json.loads(out_header["__metadata__"]["sd_lora.merged"])[1]["weight"] == -0.4
    assert_outputs(from_single_file(out, config_dir), live)


def test_fp16_output_is_summed_in_fp32_and_cast_once(items, base_file, tmp_path):
    out = merge.merge_single_file(base_file, items, tmp_path / "half.safetensors", dtype=torch.float16)
    blended = merge.blend_exact(items)
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    with safe_open(str(base_file), "pt") as src, safe_open(str(out), "pt") as f:
        exact = src.get_tensor(key) + blended.modules[name].delta()
        fused = merge.add_delta(src.get_tensor(key), blended.modules[name])  # the fp32 sum, as merge computes it
        torch.testing.assert_close(fused, exact, atol=1e-6, rtol=1e-6)
        assert torch.equal(f.get_tensor(key), fused.half())  # ...cast to fp16 once
        names = f.keys()
        assert {f.get_tensor(k).dtype for k in names} == {torch.float16}


def test_bad_adapter_writes_nothing(adapters, base_file, tmp_path):
    wrong = random_adapter(sd_lora.load_pipeline("tiny"), "attn", rank=2)
    wrong.modules["unet.down_blocks.9.attentions.0.proj_in"] = wrong.modules.popitem()[1]
    for model, out in (("tiny", tmp_path / "a.safetensors"), (base_file, tmp_path / "b.safetensors"),
                       ("tiny", tmp_path / "folder")):
        with pytest.raises(AdapterError, match="match no weight of this model"):
            merge.merge_checkpoint(model, [(adapters["a"], 1.0), (wrong, 0.5)], out)
    big = random_adapter(sd_lora.load_pipeline("tiny"), "attn", rank=2)
    name = next(iter(big.modules))
    big.modules[name].down = torch.zeros(2, 3)
    with pytest.raises(AdapterError, match=name):
        merge.merge_checkpoint(base_file, [(big, 1.0)], tmp_path / "c.safetensors")
    xl = random_adapter(sd_lora.load_pipeline("tiny"), "attn", rank=2)
    xl.family = "sdxl"
    folder = tmp_path.parent / f"{tmp_path.name}-src"
    sd_lora.load_pipeline("tiny").save_pretrained(folder)
    for model, out in (("tiny", "d.safetensors"), (base_file, "e.safetensors"), (folder, "f")):  # all three routes
        with pytest.raises(AdapterError, match="this adapter is for sdxl but the model is sd1"):
            merge.merge_checkpoint(model, [(xl, 1.0)], tmp_path / out)
    assert list(tmp_path.iterdir()) == []  # no output, no temp file


def test_two_names_for_one_module_in_one_adapter_are_refused_not_added_twice(adapters, tmp_path):
    """A diffusers file may name a module by its dotted path and by its `_`-joined form: the reader takes both keys,
    and Adapters.load refused the file, but merge added that module's update twice, and blend/convert wrote kohya
    keys in which one of the two vanished. Across two adapters, one module is of course summed."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    t = {}
    for path in ("mid_block.attentions.0.proj_in", "mid_block_attentions_0_proj_in"):
        t[f"unet.{path}.lora_A.weight"] = torch.randn(2, 64, 1, 1, generator=g)
        t[f"unet.{path}.lora_B.weight"] = torch.randn(64, 2, 1, 1, generator=g)
    save_file(t, tmp_path / "twice.safetensors")
    twice = sd_lora.read_adapter(tmp_path / "twice.safetensors")
    assert len(twice.modules) == 2
    message = (r"twice\.safetensors: unet\.mid_block\.attentions\.0\.proj_in and "
               r"unet\.mid_block_attentions_0_proj_in name the same module")
    with pytest.raises(AdapterError, match=message):
        sd_lora.attach(sd_lora.load_pipeline("tiny")).load(twice)
    pipe = sd_lora.load_pipeline("tiny")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(AdapterError, match=message):
        merge.merge_into_pipeline(pipe, [(adapters["a"], 1.0), (twice, 1.0)])
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())  # nothing changed
    for call in (lambda: merge.blend_exact([(twice, 1.0)]), lambda: lowrank.resize(merge.diffusers_named(twice), 1),
                 lambda: merge.merge_checkpoint("tiny", [(twice, 1.0)], tmp_path / "out.safetensors")):
        with pytest.raises(AdapterError, match=message):
            call()
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(AdapterError, match="name the same module"):  # a writer given such weights refuses too
        sd_lora.save_adapter(twice, tmp_path / "written.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["twice.safetensors"]
    one = sd_lora.AdapterWeights({"unet.mid_block.attentions.0.proj_in": twice.modules[
        "unet.mid_block.attentions.0.proj_in"]}, family="sd1")
    assert len(merge.blend_exact([(one, 1.0), (one, 1.0)]).modules) == 1  # two adapters: summed, as before


# ---- blending -----------------------------------------------------------------------------------------------------
def test_exact_blend_equals_loading_both_adapters(items, live, tmp_path):
    blended = merge.blend_exact(items)
    assert blended.modules[next(iter(blended.modules))].scale == 1.0
    pipe = sd_lora.load_pipeline("tiny")
    sd_lora.attach(pipe, mode="live").load(blended, name="ab")
    assert_outputs(pipe, live, atol=1e-5)
    sd_lora.save_adapter(blended, tmp_path / "ab.safetensors", dtype=torch.float32)
    pipe = sd_lora.load_pipeline("tiny")
    sd_lora.attach(pipe).load(tmp_path / "ab.safetensors")
    assert_outputs(pipe, live, atol=1e-5)


def test_blend_is_linear_per_module_and_takes_per_part_weights(adapters):
    a, b = adapters["a"], adapters["b"]
    blended = merge.blend_exact([(a, {"unet": 0.5, "text_encoder": 2.0}), (b, -1.0)])
    for name, m in blended.modules.items():
        wa = 0.5 if name.startswith("unet.") else 2.0
        want = sum(w * x.modules[name].delta() for x, w in ((a, wa), (b, -1.0)) if name in x.modules)
        torch.testing.assert_close(m.delta(), want, atol=1e-6, rtol=1e-5)
    with pytest.raises(AdapterError, match="every weight is 0"):
        merge.blend_exact([(a, 0.0)])


def test_svd_blend_reports_the_energy_it_keeps(items):
    exact = merge.blend_exact(items)
    _, report = lowrank.resize(exact, rank=12)
    assert all(m.kept == 1.0 for m in report.modules) and report.error == 0.0
    small, report = lowrank.resize(exact, rank=3)
    assert max(m.rank for m in small.modules.values()) == 3 and 0.0 < report.error < 1.0
    for fit in report.modules:
        want, got = exact.modules[fit.name].delta(), small.modules[fit.name].delta()
        actual = float((want - got).norm() / want.norm())
        assert actual == pytest.approx(fit.error, rel=1e-3, abs=1e-5), fit.name


# ---- resizing -----------------------------------------------------------------------------------------------------
def test_resize_to_full_rank_is_lossless_and_error_falls_with_rank(adapters):
    a = adapters["a"]
    same, report = lowrank.resize(a, rank=4)
    assert all(same.modules[n] is m for n, m in a.modules.items()) and report.error == 0.0
    errors = []
    for rank in (1, 2, 3):
        small, report = lowrank.resize(a, rank=rank)
        for name, m in small.modules.items():
            assert m.rank == rank and m.scale == pytest.approx(a.modules[name].scale)  # alpha keeps α/r
        errors.append(report.error)
    assert errors[0] > errors[1] > errors[2] > 0.0


def test_resize_of_an_overparameterised_adapter_is_lossless():
    """a + a at rank 8 has true rank 4: resizing to 4 loses nothing (up to float rounding)."""
    a = random_adapter(sd_lora.load_pipeline("tiny"), "attn", rank=4, seed=3)
    doubled = merge.blend_exact([(a, 0.5), (a, 0.5)])
    small, report = lowrank.resize(doubled, rank=4)
    assert report.error < 1e-5
    for name, m in small.modules.items():
        torch.testing.assert_close(m.delta(), a.modules[name].delta(), atol=1e-5, rtol=1e-4)


def test_resize_by_energy_picks_the_smallest_rank_per_module(items):
    exact = merge.blend_exact(items)
    _, report = lowrank.resize(exact, energy=0.9)
    for fit in report.modules:
        energy = lowrank.spectrum(exact.modules[fit.name]) ** 2
        share = (torch.cumsum(energy, 0) / energy.sum()).tolist()  # share[k - 1]: what the top k keep
        assert share[fit.rank_after - 1] >= 0.9 - 1e-6
        assert fit.rank_after == 1 or share[fit.rank_after - 2] < 0.9
    assert len({f.rank_after for f in report.modules}) > 1  # chosen per module
    with pytest.raises(ValueError, match="exactly one"):
        lowrank.resize(exact)


# ---- extraction ---------------------------------------------------------------------------------------------------
def test_extract_recovers_a_known_low_rank_delta(tmp_path):
    base, conv = sd_lora.load_pipeline("tiny"), "unet.down_blocks.0.resnets.0.conv1"
    known = with_conv_module(base, random_adapter(base, "attn", rank=3, seed=4), conv)
    tuned = sd_lora.load_pipeline("tiny")
    merge.merge_into_pipeline(tuned, [(known, 1.0)])
    write_single_file(tuned, tmp_path / "tuned.safetensors", None, {})
    from sd_lora.checkpoint import checkpoint_weights

    base_w, family = checkpoint_weights("tiny")
    tuned_w, tuned_family = checkpoint_weights(tmp_path / "tuned.safetensors")
    assert family == tuned_family == "sd1"
    got, report = lowrank.extract(base_w, tuned_w, rank=3, conv_rank=2)
    assert set(got.modules) == set(known.modules)
    assert len(report.skipped) > 0 and report.error < 1e-3  # everything else is unchanged
    for name, m in known.modules.items():
        torch.testing.assert_close(got.modules[name].delta(), m.delta(), atol=2e-5, rtol=1e-3)
    without_conv, _ = lowrank.extract(base_w, tuned_w, rank=3)
    assert set(without_conv.modules) == set(known.modules) - {conv}
    with pytest.raises(AdapterError, match="identical"):
        lowrank.extract(base_w, base_w, rank=3)


# ---- naming -------------------------------------------------------------------------------------------------------
SD15 = {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 2, "norm_num_groups": 8,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}


@pytest.mark.parametrize("overrides", [{}, SD15, {"block_out_channels": [32, 64], "layers_per_block": 1,
                                                    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                                                    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}])
def test_unet_layout_is_read_off_the_checkpoint_keys(overrides):
    config = {**UNet2DConditionModel.load_config(sd_lora.tiny_dir() / "unet"), **overrides}
    with torch.device("meta"):
        sd = UNet2DConditionModel.from_config(config).state_dict()
    keys = list(ldm.unet_state_dict_to_ldm(sd, config))
    layout = unet_layout_from_ldm(keys)
    assert sorted(ldm.unet_state_dict_from_ldm(dict.fromkeys(keys), layout)) == sorted(sd)


def test_ldm_named_adapter_lines_up_with_diffusers_named_one(adapters):
    a = adapters["a"]
    config = dict(sd_lora.load_pipeline("tiny").unet.config)
    renamed = {(f"unet.{ldm.unet_path_to_ldm(n[5:], config)}" if n.startswith("unet.") else n): m
               for n, m in a.modules.items()}
    as_ldm = sd_lora.AdapterWeights(renamed, family="sd1", unet_naming="ldm")
    back = merge.diffusers_named(as_ldm, config)
    assert set(back.modules) == set(a.modules) and back.unet_naming == "diffusers"
    blended = merge.blend_exact([(as_ldm, 1.0), (a, -1.0)], config)
    assert all(float(m.delta().abs().max()) < 1e-6 for m in blended.modules.values())


def test_an_fp16_folder_loads_as_fp32_on_the_cpu_and_merges_back_to_fp16(items, tmp_path):
    from sd_lora.checkpoint import stored_dtype, write_folder

    folder = write_folder(sd_lora.load_pipeline("tiny"), tmp_path / "half", torch.float16)
    assert stored_dtype(folder) == torch.float16
    pipe = sd_lora.load_pipeline(folder)  # half-precision matmuls are slow or missing on the CPU
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.float32
    assert sd_lora.load_pipeline(folder, dtype=torch.float16).unet.dtype == torch.float16  # asked for: kept
    out = merge.merge_checkpoint(folder, items, tmp_path / "merged.safetensors")  # no --dtype: the model's own
    header, _ = read_header(out)
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}
