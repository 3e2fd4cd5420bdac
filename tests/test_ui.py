"""The Gradio app (ui/app.py) as scripts and users meet it: launched as `python ui/app.py` on a free port, on the tiny
model, with adapters this file writes, and driven through gradio_client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import free_port, random_adapter, unet_out
from PIL import Image

import sd_lora
from sd_lora import grid

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ui import catalog, params

STEPS = 3  # the tiny model at 64x64: each image costs well under a second


def write_library(folder: Path) -> None:
    """Two usable adapters (one with modelspec metadata, one with A1111 sidecars), one for SDXL, one broken file."""
    pipe = sd_lora.load_pipeline("tiny")
    folder.mkdir(parents=True, exist_ok=True)
    sd_lora.save_adapter(random_adapter(pipe, seed=1, scale=0.3), folder / "mozart.safetensors",
                         metadata={"modelspec.title": "Mozart style", "modelspec.trigger_phrase": "mozart style"})
    sd_lora.save_adapter(random_adapter(pipe, seed=2, scale=0.3, parts=("unet",)), folder / "ink.safetensors")
    (folder / "ink.json").write_text(json.dumps({"preferred weight": 0.6, "activation text": "ink drawing",
                                                 "description": "Black ink lines"}))
    Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "ink.preview.png")
    xl = random_adapter(pipe, seed=3)
    xl.family = "sdxl"
    sd_lora.save_adapter(xl, folder / "xl_style.safetensors")
    (folder / "broken.safetensors").write_bytes(b"this is not a safetensors file")


class App:
    """`python ui/app.py` in a subprocess, on a free port; stopped by its own pid."""

    def __init__(self, adapters: Path, outputs: Path, log: Path, *flags: str):
        self.adapters, self.outputs = adapters, outputs
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
        self.log = log.open("w")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "ui" / "app.py"), "--adapters", str(adapters),
                                      "--outputs", str(outputs), "--port", str(self.port), *flags],
                                     cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.log_path = log

    def wait(self, timeout: float = 180.0) -> App:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the app did not answer in {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    base = tmp_path_factory.mktemp("ui")
    write_library(base / "adapters")
    server = App(base / "adapters", base / "outputs", base / "app.log").wait()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(app):
    return gradio_client.Client(app.url, verbose=False)


def generate(client, weights: dict, seed: int = 42, **kw) -> tuple[list[dict], str]:
    args = {"prompt": "a red circle", "negative_prompt": "", "weights_json": json.dumps(weights), "steps": STEPS,
            "guidance": 7.5, "seed": seed, "width": 64, "height": 64, **kw}
    return client.predict(**args, api_name="/generate")


def pixels(item: dict) -> np.ndarray:
    return np.asarray(Image.open(item["image"]).convert("RGB"), dtype=np.int16)


# ---- endpoints ----------------------------------------------------------------------------------------------------
def test_adapters_lists_the_library_with_cards_and_reasons(client):
    info = client.predict(api_name="/adapters")
    assert (info["model"], info["family"]) == ("tiny", "sd1")
    by_name = {a["name"]: a for a in info["adapters"]}
    assert {"mozart", "ink"} <= {n for n, a in by_name.items() if a["usable"]}
    assert by_name["mozart"]["title"] == "Mozart style" and by_name["mozart"]["trigger_words"] == "mozart style"
    assert by_name["ink"]["preferred_weight"] == 0.6 and by_name["ink"]["trigger_words"] == "ink drawing"
    assert by_name["mozart"]["ranks"] == [4] and by_name["mozart"]["metadata"]["ss_network_dim"] == "4"
    assert not by_name["xl_style"]["usable"] and "SDXL" in by_name["xl_style"]["error"]
    assert not by_name["broken"]["usable"] and "not a safetensors file" in by_name["broken"]["error"]


def test_generate_is_reproducible_and_weights_change_the_image(client):
    first, text = generate(client, {"mozart": 0.8})
    again, _ = generate(client, {"mozart": 0.8})
    other, _ = generate(client, {"mozart": 0.8, "ink": {"unet": 1.0, "text_encoder": 0.0}})
    base, _ = generate(client, {})
    assert np.array_equal(pixels(first[0]), pixels(again[0]))
    assert not np.array_equal(pixels(first[0]), pixels(other[0]))
    assert not np.array_equal(pixels(first[0]), pixels(base[0]))
    # The PNG carries A1111 "parameters" that parse back to the same request.
    chunks = params.read_png(first[0]["image"])
    assert "<lora:mozart:0.8>" in chunks["parameters"] and "<lora:mozart:0.8>" in text
    parsed = params.parse(chunks["parameters"])
    assert parsed["prompt"] == "a red circle" and parsed["Seed"] == "42" and parsed["Steps"] == str(STEPS)
    assert parsed["weights"] == {"mozart": {"unet": 0.8, "text_encoder": 0.8}}
    assert json.loads(chunks["sd-lora"])["weights"] == {"mozart": {"unet": 0.8, "text_encoder": 0.8}}


def test_lora_tags_in_the_prompt_apply_like_weights_json(client):
    tagged, _ = generate(client, {}, prompt="a red circle <lora:mozart:0.8>")
    plain, _ = generate(client, {"mozart": 0.8})
    assert np.array_equal(pixels(tagged[0]), pixels(plain[0]))


def test_out_of_range_settings_are_clamped_with_a_message(client):
    images, notes = generate(client, {}, steps=0, width=60, height=5000, batch_count=2)
    assert "steps 0 is out of range" in notes and "width 60" in notes and "height 5000" in notes
    assert len(images) == 2 and Image.open(images[0]["image"]).size == (64, 2048)


def test_errors_are_reported_and_the_app_keeps_serving(client):
    for bad, message in (('{"nope": 1}', "no adapter named 'nope'"), ("{not json", "not valid JSON"),
                         ('{"xl_style": 1}', "disabled"), ('{"mozart": {"vae": 1}}', "unknown part")):
        with pytest.raises(gradio_client.exceptions.AppError, match=message):
            client.predict("a red circle", "", bad, STEPS, 7.5, 1, 64, 64, api_name="/generate")
    images, _ = generate(client, {"mozart": 0.5})
    assert len(images) == 1


def test_concurrent_requests_never_mix_blends(app, client):
    solo = {w: pixels(generate(client, {"mozart": w}, seed=7)[0][0]) for w in (1.0, -1.0)}
    results = {}

    def call(w):
        results[w] = pixels(generate(gradio_client.Client(app.url, verbose=False), {"mozart": w}, seed=7)[0][0])

    threads = [threading.Thread(target=call, args=(w,)) for w in (1.0, -1.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for w in (1.0, -1.0):
        assert np.array_equal(results[w], solo[w])


# ---- compare, sweep, export, merge ----------------------------------------------------------------------------------
def test_compare_makes_base_and_each_adapter_in_one_pass(client):
    ink = {"unet": 0.6, "text_encoder": 0.2}  # a text-encoder weight of its own survives the per-sample route
    images, _ = client.predict("a red circle", "", json.dumps({"mozart": 0.8, "ink": ink}), STEPS, 7.5, 42, 64, 64,
                               api_name="/compare")
    assert [i["caption"] for i in images] == ["side by side", "base model", "mozart 0.8", "ink 0.6 / te 0.2", "blend"]
    # Routed tiles match separate generations (batched math may differ in the last bit of a pixel).
    for item, weights in ((images[1], {}), (images[2], {"mozart": 0.8}), (images[3], {"ink": ink}),
                          (images[4], {"mozart": 0.8, "ink": ink})):
        alone = pixels(generate(client, weights)[0][0])
        assert np.abs(pixels(item) - alone).max() <= 2
    assert Image.open(images[0]["image"]).width >= 4 * 64


def test_sweep_grid_is_labelled_five_by_y(client):
    images, _ = client.predict("a red circle", "", '{"ink": 0.6}', STEPS, 7.5, 42, 64, 64, "mozart", -1.0, 1.0,
                               "ink", 0.0, 1.0, 2, api_name="/sweep")
    sheet = Image.open(images[0]["image"])
    text = params.read_png(images[0]["image"])["parameters"]
    assert "X: \"<lora:mozart> -1, -0.5, 0, 0.5, 1\"" in text and "<lora:ink> 0, 1" in text
    assert sheet.width > 5 * 160 and sheet.height > 2 * 160  # tiles scaled up next to their labels


def test_sweep_tiles_are_the_images_each_blend_makes(client):
    """Y = seed; the other enabled adapter keeps its own text-encoder weight in every tile."""
    mozart = {"unet": 0.6, "text_encoder": -1.0}  # mozart has text-encoder modules (ink has none)
    images, _ = client.predict("a red circle", "", json.dumps({"mozart": mozart}), STEPS, 7.5, 42, 64, 64, "ink",
                               -1.0, 1.0, "seed", 0.0, 1.0, 2, api_name="/sweep")
    xs = [-1.0, -0.5, 0.0, 0.5, 1.0]
    rows = [[Image.open(generate(client, {"ink": x, "mozart": mozart}, seed=seed)[0][0]["image"]).convert("RGB")
             for x in xs] for seed in (42, 43)]
    expected = grid.labelled_grid(rows, [f"ink {params.number(x)}" for x in xs], ["seed 42", "seed 43"],
                                  title="a red circle")
    got = np.asarray(Image.open(images[0]["image"]).convert("RGB"), dtype=np.int16)
    assert got.shape == np.asarray(expected).shape
    assert np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 2  # batched vs single: last-bit differences
    assert not np.array_equal(np.asarray(rows[0][0]), np.asarray(rows[0][4]))  # the weight shows in the tiles


def test_an_adapter_named_seed_can_be_swept_on_y(tmp_path):
    """Y "seed" steps the seed, so an adapter named seed could only be swept on X. The Y list now offers it as
    `<lora:seed>` (what the API takes too), and "seed" keeps stepping the seed."""
    from ui.app import _y_choices
    from ui.engine import Settings, Studio

    library = tmp_path / "adapters"
    library.mkdir()
    pipe = sd_lora.load_pipeline("tiny")
    sd_lora.save_adapter(random_adapter(pipe, seed=1, scale=0.3), library / "mozart.safetensors")
    sd_lora.save_adapter(random_adapter(pipe, seed=2, scale=0.3), library / "seed.safetensors")
    studio = Studio("tiny", [library], tmp_path / "outputs")
    assert _y_choices(studio) == ["seed", "mozart", "<lora:seed>"]
    s = Settings("a red circle", steps=2, seed=7, width=64, height=64)
    result = studio.sweep(s, {}, "mozart", (0.0, 1.0), "<lora:seed>", (-1.0, 1.0), 2)
    assert 'Y: "<lora:seed> -1, 1"' in result.parameters
    assert json.loads(params.read_png(result.images[0][0])["sd-lora"])["sweep"]["y"] == ["<lora:seed>", [-1.0, 1.0]]
    xs = [0.0, 0.25, 0.5, 0.75, 1.0]
    rows = [[Image.open(studio.generate(s, studio.parse_weights({"mozart": x, "seed": y})).images[0][0])
             .convert("RGB") for x in xs] for y in (-1.0, 1.0)]
    expected = grid.labelled_grid(rows, [f"mozart {params.number(x)}" for x in xs], ["seed -1", "seed 1"],
                                  title="a red circle")
    got = np.asarray(Image.open(result.images[0][0]).convert("RGB"), dtype=np.int16)
    assert np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 2  # batched vs single: last-bit differences
    assert 'Y: "Seed 7, 8"' in studio.sweep(s, {}, "seed", (0.0, 1.0), "seed", (0.0, 1.0), 2).parameters
    with pytest.raises(ValueError, match="no usable adapter named 'ink' to sweep"):
        studio.sweep(s, {}, "ink", (0.0, 1.0), "seed")


def test_export_blend_writes_a_lora_that_sd_lora_and_diffusers_load(app, client):
    thumb = generate(client, {"mozart": 0.8})[0][0]["image"]
    path, notes = client.predict('{"mozart": 0.8, "ink": 0.6}', "duo", 0, "Duo", "Ada", "duo style", "MIT",
                                 "Two styles", gradio_client.handle_file(thumb), api_name="/export_lora")
    w = sd_lora.read_adapter(path)
    assert w.family == "sd1" and w.ranks == {4, 8}  # exact: ranks concatenated where both adapters have a module
    md = w.metadata
    assert (md["modelspec.title"], md["modelspec.author"], md["modelspec.trigger_phrase"],
            md["modelspec.license"], md["modelspec.description"]) == ("Duo", "Ada", "duo style", "MIT", "Two styles")
    assert catalog.image_from_data_uri(md["modelspec.thumbnail"]).size == (64, 64)

    # The exported file equals the blend: sd_lora loading it at weight 1 matches both sources at their weights.
    saved = app.outputs / "loras" / "duo.safetensors"  # the client got a copy; the app keeps it, with sidecars
    assert saved.is_file() and saved.with_suffix(".preview.png").is_file()
    assert json.loads(saved.with_suffix(".json").read_text())["activation text"] == "duo style"
    blend, one = sd_lora.load_pipeline("tiny"), sd_lora.load_pipeline("tiny")
    lora = sd_lora.attach(blend)
    for name in ("mozart", "ink"):
        lora.load(app.adapters / f"{name}.safetensors", name=name)
    lora.set_weights({"mozart": 0.8, "ink": 0.6})
    sd_lora.attach(one).load(path, name="duo")
    # The file is fp16, so compare against the size of the blend's effect rather than an absolute tolerance.
    effect = (unet_out(blend) - unet_out(sd_lora.load_pipeline("tiny"))).abs().max()
    assert (unet_out(one) - unet_out(blend)).abs().max() <= 0.02 * effect
    peer = sd_lora.load_pipeline("tiny")
    peer.load_lora_weights(str(Path(path).parent), weight_name=Path(path).name, adapter_name="duo")
    torch.testing.assert_close(unet_out(peer), unet_out(one), atol=1e-4, rtol=1e-4)

    small, notes = client.predict('{"mozart": 0.8, "ink": 0.6}', "duo", 2, "", "", "", "", "", None,
                                  api_name="/export_lora")
    assert sd_lora.read_adapter(small).ranks == {2} and "SVD to rank 2" in notes


def test_merge_into_checkpoint_loads_in_sd_lora_and_diffusers(client, tmp_path):
    from diffusers import StableDiffusionPipeline

    path, _ = client.predict('{"mozart": 0.8}', True, api_name="/merge_checkpoint")
    merged = sd_lora.load_pipeline(path)
    image = merged("a red circle", num_inference_steps=STEPS, height=64, width=64, guidance_scale=7.5,
                   generator=torch.Generator().manual_seed(42)).images[0]
    assert np.abs(np.asarray(image, dtype=np.int16) - pixels(generate(client, {"mozart": 0.8})[0][0])).max() <= 2
    StableDiffusionPipeline.from_single_file(path, config=str(sd_lora.tiny_dir()), safety_checker=None)

    archive, _ = client.predict('{"mozart": 0.8}', False, api_name="/merge_checkpoint")
    with zipfile.ZipFile(archive) as z:
        z.extractall(tmp_path)
    folder = next(p.parent for p in tmp_path.rglob("model_index.json"))
    folder_pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    torch.testing.assert_close(unet_out(folder_pipe), unet_out(merged))


# ---- safety -----------------------------------------------------------------------------------------------------
def test_serves_files_only_from_the_adapter_and_output_folders(app, client):
    image = generate(client, {})[0][0]["image"]
    saved = next(app.outputs.rglob("*.png"))
    for path, allowed in ((saved, True), (ROOT / "pyproject.toml", False), (Path("/etc/passwd"), False)):
        url = f"{app.url}gradio_api/file={path}"
        try:
            status = urllib.request.urlopen(url, timeout=10).status
        except urllib.error.HTTPError as e:
            status = e.code
        assert (status == 200) == allowed, (path, status)
    assert Path(image).is_file()


def test_the_running_app_refuses_uploads_over_its_cap(tmp_path):
    import httpx

    small = tmp_path / "small.safetensors"
    sd_lora.save_adapter(random_adapter(sd_lora.load_pipeline("tiny"), seed=6), small)
    server = App(tmp_path / "adapters", tmp_path / "outputs", tmp_path / "app.log", "--max-upload-mb", "1").wait()
    try:
        big = httpx.post(server.url + "gradio_api/upload", files={"files": ("big.safetensors", b"\0" * (2 << 20))})
        assert big.status_code == 413, big.text
        ok = httpx.post(server.url + "gradio_api/upload", files={"files": ("small.safetensors", small.read_bytes())})
        assert ok.status_code == 200, ok.text
    finally:
        server.stop()


def test_moving_a_slider_reloads_nothing(tmp_path, monkeypatch):
    """Adapters are read once, when the library is scanned; a new blend is only a new set of weights."""
    from ui.engine import Settings, Studio

    write_library(tmp_path / "adapters")
    studio = Studio("tiny", [tmp_path / "adapters"], tmp_path / "outputs")
    reads = []
    monkeypatch.setattr(sd_lora, "read_adapter", lambda *a, **k: reads.append(a) or pytest.fail("re-read"))
    s = Settings("a red circle", steps=2, seed=1)
    a = studio.generate(s, studio.parse_weights('{"mozart": 0.5}')).images[0][0]
    b = studio.generate(s, studio.parse_weights('{"mozart": 0.55, "ink": 0.2}')).images[0][0]
    assert not reads and not np.array_equal(pixels({"image": a}), pixels({"image": b}))


def test_compare_is_one_batched_pipeline_call(tmp_path, monkeypatch):
    from ui.engine import Settings, Studio

    write_library(tmp_path / "adapters")
    studio = Studio("tiny", [tmp_path / "adapters"], tmp_path / "outputs")
    calls, real = [], type(studio.pipe).__call__
    monkeypatch.setattr(type(studio.pipe), "__call__", lambda pipe, *a, **k: calls.append(k["prompt"]) or
                        real(pipe, *a, **k))  # a spy: every call still runs the real pipeline
    result = studio.compare(Settings("a red circle", steps=2, seed=1),
                            studio.parse_weights('{"mozart": 0.8, "ink": 0.6}'))
    assert len(calls) == 1 and len(calls[0]) == 4  # base, mozart, ink, blend: one batch of four
    assert len(result.images) == 5  # the strip and the four tiles


def test_flags_default_to_a_private_local_app(tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    from ui.app import parse_args

    monkeypatch.chdir(tmp_path)
    args = parse_args([])
    assert (args.host, args.share, args.max_upload_mb, args.model) == ("127.0.0.1", False, 512, "tiny")
    assert args.adapters == ["adapters"]
    (tmp_path / "output").mkdir()  # where the trainer writes: listed too when it exists
    assert parse_args([]).adapters == ["adapters", "output"]


def test_share_and_a_public_host_print_a_warning_first(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "ui" / "app.py"), "--share", "--host", "0.0.0.0",
                             "--port", str(free_port()), "--adapters", str(tmp_path / "a"), "--outputs",
                             str(tmp_path / "o")], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    warnings = []
    try:  # printed before the model loads or anything listens
        for _ in range(50):
            line = proc.stderr.readline()
            warnings += [line] if line.startswith("WARNING: ") else []
            if len(warnings) == 2 or not line:
                break
    finally:
        proc.kill()
        proc.wait()
    assert warnings[0].startswith("WARNING: --share publishes this app at a public gradio.live address")
    assert warnings[1].startswith("WARNING: listening on 0.0.0.0: other machines on the network can use this app")


def test_parameters_text_round_trips_a1111_syntax():
    weights = {"mozart": {"unet": 0.8, "text_encoder": 0.8}, "ink": {"unet": 0.5, "text_encoder": 0.2}}
    text = params.infotext("a violin, red", "blurry", weights, {"Steps": 20, "Seed": 7, "Lora hashes": "a: 1, b: 2"})
    assert text.splitlines()[0] == "a violin, red <lora:mozart:0.8> <lora:ink:unet=0.5:te=0.2>"
    parsed = params.parse(text)
    assert (parsed["prompt"], parsed["negative_prompt"], parsed["weights"]) == ("a violin, red", "blurry", weights)
    assert parsed["Lora hashes"] == "a: 1, b: 2"
    # A1111's positional form: the first number is the text encoder's, the second the UNet's.
    assert params.extract_tags("cat <lora:x:0.2:1>")[1] == {"x": {"unet": 1.0, "text_encoder": 0.2}}
