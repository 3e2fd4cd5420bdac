"""The `sd-lora` command, run as users run it: results on disk, one-line errors with exit code 2, nothing written."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import random_adapter, te_out, unet_out, with_conv_module
from PIL import Image
from safetensors.torch import save_file

import sd_lora
from sd_lora import cli, lowrank, read_adapter


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two kohya files on disk: a (full set, rank 4, per-module alphas, with metadata) and b (attention, rank 8)."""
    folder = tmp_path_factory.mktemp("adapters")
    tiny = sd_lora.load_pipeline("tiny")
    sd_lora.save_adapter(random_adapter(tiny, "full", rank=4, seed=1), folder / "a.safetensors", dtype=torch.float32,
                         metadata={"modelspec.trigger_phrase": "mozart style, ornate", "ss_learning_rate": "0.0001",
                                   "modelspec.title": "Mozart ornate"})
    sd_lora.save_adapter(random_adapter(tiny, "attn", rank=8, seed=2, alphas=3.0), folder / "b.safetensors")
    return folder / "a.safetensors", folder / "b.safetensors"


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def live(a, b, wa, wb):
    pipe = sd_lora.load_pipeline("tiny")
    lora = sd_lora.attach(pipe, mode="live")
    lora.load(a, name="a")
    lora.load(b, name="b")
    lora.set_weights({"a": wa, "b": wb})
    return pipe


def assert_same_outputs(pipe, ref, atol=1e-4):
    torch.testing.assert_close(unet_out(pipe), unet_out(ref), atol=atol, rtol=atol)
    torch.testing.assert_close(te_out(pipe), te_out(ref), atol=atol, rtol=atol)


def test_merge_writes_a_single_file_with_the_blend(files, tmp_path, capsys):
    a, b = files
    out = tmp_path / "merged.safetensors"
    code, stdout, _ = run(capsys, "merge", "--model", "tiny", "--lora", f"{a}:0.7", "--lora", f"{b}:-0.4",
                          "--out", out)
    assert code == 0 and "a.safetensors ×0.7" in stdout
    assert_same_outputs(sd_lora.load_pipeline(out), live(a, b, 0.7, -0.4))
    code, _, _ = run(capsys, "merge", "--model", out, "--lora", f"{b}:0.4", "--out", tmp_path / "back", "--dtype",
                     "fp32")  # single file in, diffusers folder out: b cancels
    assert code == 0
    assert_same_outputs(sd_lora.load_pipeline(tmp_path / "back"), live(a, b, 0.7, 0.0))


def test_blend_exact_and_by_svd(files, tmp_path, capsys):
    a, b = files
    code, stdout, _ = run(capsys, "blend", f"{a}:0.7", f"{b}:-0.4", "--out", tmp_path / "ab.safetensors",
                          "--dtype", "fp32")
    assert code == 0 and "exact" in stdout
    pipe = sd_lora.load_pipeline("tiny")
    sd_lora.attach(pipe, mode="live").load(tmp_path / "ab.safetensors")
    assert_same_outputs(pipe, live(a, b, 0.7, -0.4), atol=1e-5)
    code, stdout, _ = run(capsys, "blend", f"{a}:0.7", f"{b}:-0.4", "--out", tmp_path / "ab4.safetensors",
                          "--rank", "4")
    lines = stdout.strip().splitlines()
    assert code == 0 and len(lines) == len(read_adapter(tmp_path / "ab.safetensors").modules) + 1
    assert all("energy kept" in line for line in lines)
    small = read_adapter(tmp_path / "ab4.safetensors")
    assert small.ranks == {4}
    assert small.modules[next(iter(small.modules))].down.dtype == torch.float32  # a is fp32, b fp16: the wider


def test_resize_prints_the_error_and_keeps_the_scale(files, tmp_path, capsys):
    a, _ = files
    code, stdout, _ = run(capsys, "resize", a, "--rank", "2", "--out", tmp_path / "r2.safetensors")
    assert code == 0 and "relative error" in stdout.splitlines()[-1]
    small, original = read_adapter(tmp_path / "r2.safetensors"), read_adapter(a)
    assert small.ranks == {2} and small.metadata["ss_network_dim"] == "2"
    assert small.metadata["ss_output_name"] == "r2" and small.metadata["modelspec.title"] == "Mozart ornate"
    assert all(small.modules[n].scale == pytest.approx(m.scale) for n, m in original.modules.items())
    code, stdout, _ = run(capsys, "resize", a, "--energy", "0.9", "--out", tmp_path / "e.safetensors")
    assert code == 0 and "energy kept" in stdout.splitlines()[-1]
    chosen = read_adapter(tmp_path / "e.safetensors")
    for name, m in original.modules.items():  # per module: the smallest rank keeping 90% of the energy
        assert chosen.modules[name].rank == lowrank.rank_for_energy(lowrank.spectrum(m), 0.9)


def test_inspect_a_kohya_file(files, tmp_path, capsys):
    a, _ = files
    code, text, _ = run(capsys, "inspect", a)
    assert code == 0
    for expected in ("format       kohya", "base family  Stable Diffusion 1.x",
                     "modules      96: text_encoder 12, unet 84", "ranks        4 (all 96 modules)",
                     "trigger      mozart style, ornate", "ss_learning_rate", "effective rank (90% of Σσ²)",
                     "title        Mozart ornate", "dtype        float32 (all 192 tensors)",
                     f"({a.stat().st_size / 2**20:.2f} MB)"):
        assert expected in text
    assert "unet.down_blocks.0.attentions.0.proj_in" in text
    code, raw, _ = run(capsys, "inspect", a, "--json", "--plot", tmp_path / "spectrum.png")
    info = json.loads(raw)
    assert info["format"] == "kohya" and info["parts"] == {"text_encoder": 12, "unet": 84}
    assert info["training"]["ss_learning_rate"] == "0.0001" and info["trigger_words"] == ["mozart style", "ornate"]
    w = read_adapter(a)
    for m in info["module_details"][:5]:
        s = lowrank.spectrum(w.modules[m["name"]])
        assert m["effective_rank"] == lowrank.rank_for_energy(s, 0.9) and 1 <= m["effective_rank"] <= 4
    assert (tmp_path / "spectrum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_plot_without_matplotlib_is_a_clear_error(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = run(capsys, "inspect", files[0], "--plot", tmp_path / "s.png")
    assert code == 2 and "pip install matplotlib" in err and not (tmp_path / "s.png").exists()


def test_convert_round_trips(files, tmp_path, capsys):
    a, _ = files
    assert run(capsys, "convert", a, "--to", "diffusers", "--out", tmp_path / "d.safetensors")[0] == 0
    assert run(capsys, "convert", tmp_path / "d.safetensors", "--to", "kohya", "--out", tmp_path / "k.safetensors")[0] == 0
    original, diffusers, back = (read_adapter(p) for p in (a, tmp_path / "d.safetensors", tmp_path / "k.safetensors"))
    assert (diffusers.format, back.format) == ("diffusers", "kohya")
    for w in (diffusers, back):
        assert set(w.modules) == set(original.modules)
        for name, m in original.modules.items():
            assert torch.equal(w.modules[name].down, m.down) and torch.equal(w.modules[name].up, m.up)
            assert w.modules[name].alpha_value == m.alpha_value
    assert back.metadata["modelspec.trigger_phrase"] == "mozart style, ornate"


def test_extract_from_two_checkpoints(files, tmp_path, capsys):
    _, b = files
    run(capsys, "merge", "--model", "tiny", "--lora", b, "--out", tmp_path / "tuned.safetensors")
    code, stdout, _ = run(capsys, "extract", "--base", "tiny", "--tuned", tmp_path / "tuned.safetensors",
                          "--rank", "8", "--out", tmp_path / "x.safetensors", "--dtype", "fp32")
    assert code == 0 and "unchanged" in stdout
    got, want = read_adapter(tmp_path / "x.safetensors"), read_adapter(b)
    assert set(got.modules) == set(want.modules)
    for name, m in want.modules.items():
        torch.testing.assert_close(got.modules[name].delta(), m.delta(), atol=1e-4, rtol=1e-2)


def test_extract_with_conv_rank_covers_the_convolutions(tmp_path, capsys):
    tiny, conv = sd_lora.load_pipeline("tiny"), "unet.up_blocks.1.resnets.0.conv2"
    known = with_conv_module(tiny, random_adapter(tiny, "attn", rank=2, seed=5), conv)
    weight = tiny.unet.get_submodule(conv[5:]).weight
    sd_lora.save_adapter(known, tmp_path / "known.safetensors", dtype=torch.float32)
    run(capsys, "merge", "--model", "tiny", "--lora", tmp_path / "known.safetensors", "--out",
        tmp_path / "tuned.safetensors")
    for flags, covered in (([], set(known.modules) - {conv}), (["--conv-rank", "2"], set(known.modules))):
        out = tmp_path / f"x{len(flags)}.safetensors"
        code, _, _ = run(capsys, "extract", "--base", "tiny", "--tuned", tmp_path / "tuned.safetensors", "--rank", "2",
                         *flags, "--out", out, "--dtype", "fp32")
        got = read_adapter(out)
        assert code == 0 and set(got.modules) == covered
    assert got.modules[conv].down.shape == (2, *weight.shape[1:])
    torch.testing.assert_close(got.modules[conv].delta(), known.modules[conv].delta(), atol=1e-4, rtol=1e-2)


def test_generate_writes_an_image_with_its_settings(files, tmp_path, capsys):
    a, _ = files
    out = tmp_path / "img.png"
    code, _, _ = run(capsys, "generate", "--lora", f"{a}:0.5", "--prompt", "a red circle", "--out", out,
                     "--steps", "2", "--size", "64x64", "--seed", "3", "--negative", "blurry", "--cfg", "5")
    assert code == 0
    image = Image.open(out)
    text = image.text["parameters"]
    assert image.size == (64, 64) and "Seed: 3" in text and "Negative prompt: blurry" in text
    assert "CFG scale: 5" in text and f"<lora:{a.stem}:0.5>" in text
    run(capsys, "generate", "--lora", f"{a}:0.5", "--prompt", "a red circle", "--out", tmp_path / "plain.png",
        "--steps", "2", "--size", "64x64", "--seed", "3", "--cfg", "5")
    assert not np.array_equal(np.asarray(image), np.asarray(Image.open(tmp_path / "plain.png")))  # negative used


BAD = {
    "missing adapter": ["blend", "{tmp}/nope.safetensors", "--out", "{tmp}/out.safetensors"],
    "not a number": ["blend", "{a}:heavy", "--out", "{tmp}/out.safetensors"],
    "nan weight": ["blend", "{a}:nan", "--out", "{tmp}/out.safetensors"],
    "empty checkpoint": ["merge", "--model", "{tmp}/empty.safetensors", "--lora", "{a}", "--out",
                         "{tmp}/out.safetensors"],
    "checkpoint cut short": ["extract", "--base", "{tmp}/hollow.safetensors", "--tuned", "{tmp}/hollow.safetensors",
                             "--rank", "1", "--out", "{tmp}/out.safetensors"],
    "truncated adapter": ["merge", "--lora", "{tmp}/cut.safetensors", "--out", "{tmp}/out.safetensors"],
    "pickle adapter": ["convert", "{tmp}/old.ckpt", "--to", "kohya", "--out", "{tmp}/out.safetensors"],
    "adapter output not safetensors": ["blend", "{a}", "--out", "{tmp}/out.ckpt"],
    "checkpoint output not safetensors": ["merge", "--lora", "{a}", "--out", "{tmp}/out.ckpt"],
    "unknown model": ["merge", "--model", "{tmp}/missing", "--lora", "{a}", "--out", "{tmp}/out"],
    "resize without a rank": ["resize", "{a}", "--out", "{tmp}/out.safetensors"],
    "energy above 1": ["resize", "{a}", "--energy", "1.5", "--out", "{tmp}/out.safetensors"],
    "rank 0": ["blend", "{a}", "--rank", "0", "--out", "{tmp}/out.safetensors"],
    "bad size": ["generate", "--prompt", "x", "--size", "65x64", "--out", "{tmp}/out.png"],
    "image suffix": ["generate", "--prompt", "x", "--out", "{tmp}/out.gif"],
    "not a LoRA": ["inspect", "{tmp}/cut.safetensors"],
    "rank-0 adapter": ["inspect", "{tmp}/rank0.safetensors"],
    "alpha not one number": ["blend", "{tmp}/alphas.safetensors", "--out", "{tmp}/out.safetensors"],
    "no command": [],
    "unknown flag": ["convert", "{a}", "--to", "kohya", "--out", "{tmp}/out.safetensors", "--fast"],
}


SAYS = {"not a number": "the weight after ':' must be a number, got 'heavy'", "nan weight": "finite number",
        "empty checkpoint": "empty.safetensors: not a safetensors file",
        "checkpoint cut short": "hollow.safetensors: truncated", "rank-0 adapter": "rank0.safetensors: ",
        "alpha not one number": "alphas.safetensors: module unet.mid_block.attentions.0.proj_in: alpha must be one"}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, files, tmp_path, capsys):
    (tmp_path / "cut.safetensors").write_bytes(files[0].read_bytes()[:1000])
    (tmp_path / "old.ckpt").write_bytes(b"\x80\x04junk")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    header = json.dumps({"model.diffusion_model.conv_in.weight": {"dtype": "F32", "shape": [10, 10],
                                                                   "data_offsets": [0, 400]}}).encode()
    (tmp_path / "hollow.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)  # no tensor bytes
    stem = "lora_unet_mid_block_attentions_0_proj_in"
    save_file({f"{stem}.lora_down.weight": torch.ones(0, 64, 1, 1), f"{stem}.lora_up.weight": torch.ones(64, 0, 1, 1)},
              tmp_path / "rank0.safetensors")
    save_file({f"{stem}.lora_down.weight": torch.ones(2, 64, 1, 1), f"{stem}.lora_up.weight": torch.ones(64, 2, 1, 1),
               f"{stem}.alpha": torch.ones(2)}, tmp_path / "alphas.safetensors")
    before = set(tmp_path.iterdir())
    code, _, err = run(capsys, *[x.format(tmp=tmp_path, a=files[0]) for x in BAD[case]])
    assert code == 2
    assert err.startswith("sd-lora: error: ") and err.count("\n") == 1, err
    assert SAYS.get(case, "") in err
    assert set(tmp_path.iterdir()) == before


def test_ui_runs_the_apps_main(tmp_path, capsys, monkeypatch):
    app = tmp_path / "ui" / "app.py"
    app.parent.mkdir()
    app.write_text("def main(argv):\n    print('ui', argv)\n    return 0\n")
    monkeypatch.setattr(cli, "UI_APP", app)
    code, out, _ = run(capsys, "ui", "--port", "7861")
    assert code == 0 and out.strip() == "ui ['--port', '7861']"
    monkeypatch.setattr(cli, "UI_APP", tmp_path / "missing.py")
    code, _, err = run(capsys, "ui")
    assert code == 2 and "not installed" in err


def test_console_entry_point_help():
    done = subprocess.run([sys.executable, "-m", "sd_lora.cli", "--help"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0
    for command in ("generate", "merge", "blend", "resize", "extract", "inspect", "convert", "ui"):
        assert command in done.stdout
