"""The app in a real browser: Debian's Chromium driven by Playwright (settings in DESIGN.md). The page loads, a weight
slider is moved, Generate is clicked, and an image appears. The screenshot is kept in test-artifacts/."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    missing = ("Debian's chromium is not installed (/usr/bin/chromium): apt-get install -y chromium"
               if not CHROMIUM.is_file() else None)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = missing or "the playwright Python package is not installed (pip install -e '.[dev]')"
    if missing:  # .ci/run sets SD_LORA_REQUIRE_BROWSER: there a missing browser is a failure, not a skip
        (pytest.fail if os.environ.get("SD_LORA_REQUIRE_BROWSER") else pytest.skip)(missing)
    pytest.importorskip("gradio")
    from test_ui import App, write_library

    base = tmp_path_factory.mktemp("ui-browser")
    write_library(base / "adapters")
    server = App(base / "adapters", base / "outputs", base / "app.log").wait()
    yield server
    server.stop()


@pytest.fixture
def page(tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=ARGS,
            viewport={"width": 1400, "height": 1000})
        try:
            yield context.new_page()
        finally:
            context.close()


def test_move_a_slider_generate_and_see_the_image(app, page):
    from playwright.sync_api import expect

    page.goto(app.url)
    expect(page.get_by_role("heading", name="sd-lora studio")).to_be_visible(timeout=60_000)
    # Usable adapters are listed first (ink, mozart), then disabled ones with their reason. (A gr.Group puts its
    # elem_id on two nested elements, hence .first.)
    expect(page.locator("#lora-row-1").first).to_contain_text("Mozart style")
    expect(page.locator("#lora-row-2").first).to_contain_text("Disabled")
    card = page.locator("#lora-row-0").first  # ink: rank, family and the .preview.png sidecar on its card
    expect(card).to_contain_text("SD 1.x · rank 4 · 84 UNet modules")
    expect(card.locator("img").first).to_be_visible()

    page.locator("#prompt textarea").fill("a red circle on a blue background")
    page.locator("#steps input[type=number]").fill("3")
    page.locator("#steps input[type=number]").press("Enter")
    page.locator("#seed input").fill("42")
    slider = page.locator("#lora-weight-1 input[type=range]")
    slider.focus()
    for _ in range(4):  # 1.0 -> 0.8 in steps of 0.05, as a keyboard user would
        slider.press("ArrowLeft")
    expect(page.locator("#lora-weight-1 input[type=number]")).to_have_value("0.8")
    expect(page.locator("#lora-on-1 input[type=checkbox]")).to_be_checked()  # moving a slider switches it on

    page.locator("#generate-btn").click()
    image = page.locator("#gallery img").first
    expect(image).to_be_visible(timeout=90_000)
    expect(page.locator("#status")).to_contain_text("Done", timeout=30_000)
    page.get_by_text("Reproduce: parameters").click()
    expect(page.locator("#infotext textarea")).to_have_value(re.compile(r"<lora:mozart:0\.8>"))
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui_generate.png"), full_page=True)

    page.locator("#steps input[type=number]").fill("150")  # long enough to watch the progress bar move
    page.locator("#steps input[type=number]").press("Enter")
    page.locator("#generate-btn").click()
    bar = page.locator("#gallery .progress-level").first  # gr.Progress: "image 1 of 1 - 25.3%", moving
    expect(bar).to_contain_text(re.compile(r"image 1 of 1 - \d+(\.\d+)?%"), timeout=30_000)
    expect(page.locator("#status")).to_contain_text("Done", timeout=90_000)


def test_upload_adds_a_row_and_rejects_what_is_not_a_lora(app, page, tmp_path):
    from playwright.sync_api import expect
    from test_ui import random_adapter

    import sd_lora

    good = tmp_path / "watercolor.safetensors"
    sd_lora.save_adapter(random_adapter(sd_lora.load_pipeline("tiny"), seed=9), good)
    bad = tmp_path / "notes.safetensors"
    bad.write_bytes(b"\x80\x04 a pickle in disguise")
    page.goto(app.url)
    expect(page.get_by_role("heading", name="sd-lora studio")).to_be_visible(timeout=60_000)
    page.get_by_text("Add adapters").click()
    page.locator("input[type=file]").set_input_files([str(good), str(bad)])
    expect(page.locator("#lora-row-4").first).to_contain_text("watercolor", timeout=30_000)
    expect(page.get_by_text("added watercolor")).to_be_visible()
    expect(page.get_by_text(re.compile("rejected: notes.safetensors: not a safetensors file"))).to_be_visible()
    assert (app.adapters / "watercolor.safetensors").is_file() and not (app.adapters / "notes.safetensors").exists()


def test_trigger_advanced_weights_compare_sweep_export_and_merge(app, page):
    """The rest of the page as a person uses it: one click inserts trigger words, the advanced toggle gives a row its
    own text-encoder weight (kept across toggles), and Compare, Sweep, Export and Merge write files that load."""
    from playwright.sync_api import expect

    import sd_lora

    page.goto(app.url)
    expect(page.get_by_role("heading", name="sd-lora studio")).to_be_visible(timeout=60_000)
    expect(page.get_by_text("Model tiny (SD 1.x) on cpu")).to_be_visible()  # the header names model and device
    page.get_by_role("button", name="Random").click()
    expect(page.locator("#seed input")).not_to_have_value("-1")
    page.locator("#prompt textarea").fill("a red circle")
    page.locator("#lora-trigger-1").click()  # mozart's card: "+ mozart style"
    expect(page.locator("#prompt textarea")).to_have_value("a red circle, mozart style")
    page.locator("#prompt textarea").fill("a red circle")
    page.locator("#steps input[type=number]").fill("3")
    page.locator("#steps input[type=number]").press("Enter")
    page.locator("#seed input").fill("42")

    weight, te = page.locator("#lora-weight-1 input[type=range]"), page.locator("#lora-te-1 input[type=range]")
    weight.focus()
    for _ in range(4):  # mozart 1.0 -> 0.8; outside advanced mode the text-encoder weight follows
        weight.press("ArrowLeft")
    page.locator("#advanced input").check()
    expect(page.locator("#lora-te-1 input[type=number]")).to_have_value("0.8")
    te.focus()
    for _ in range(6):  # its own text-encoder weight: 0.5
        te.press("ArrowLeft")
    page.locator("#advanced input").uncheck()
    page.locator("#advanced input").check()
    expect(page.locator("#lora-te-1 input[type=number]")).to_have_value("0.5")  # toggling keeps it
    expect(page.locator("#lora-weight-1 input[type=number]")).to_have_value("0.8")
    page.locator("#lora-on-0 input").check()  # ink at its preferred weight, 0.6

    page.locator("#generate-btn").click()  # the export's thumbnail is the last image
    expect(page.locator("#status")).to_contain_text("Done", timeout=90_000)

    page.get_by_role("tab", name="Compare").click()
    page.locator("#compare-btn").click()
    expect(page.locator("#compare-image img")).to_be_visible(timeout=90_000)
    page.locator("#sweep-btn").click()
    expect(page.locator("#sweep-image img")).to_be_visible(timeout=120_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui_compare.png"), full_page=True)
    compare = sorted((app.outputs / "compare").rglob("*.png"))
    labels = [sd_lora_params(p).get("compare") for p in compare]
    assert ["base model", "ink 0.6", "mozart 0.8 / te 0.5", "blend"] in labels
    assert len(list((app.outputs / "grids").rglob("*.png"))) >= 1

    page.get_by_role("tab", name="Merge & export").click()
    page.locator("#card-title input, #card-title textarea").first.fill("Ink and Mozart")
    page.locator("#export-btn").click()
    expect(page.locator("#export-file")).to_be_visible(timeout=60_000)
    exported = sd_lora.read_adapter(app.outputs / "loras" / "blend.safetensors")
    assert exported.metadata["modelspec.title"] == "Ink and Mozart" and "modelspec.thumbnail" in exported.metadata
    mozart = sd_lora.read_adapter(app.adapters / "mozart.safetensors")
    name = next(n for n in mozart.modules if n.startswith("text_encoder."))  # ink has no text-encoder modules
    assert abs(float(exported.modules[name].delta().norm() / mozart.modules[name].delta().norm()) - 0.5) < 1e-2

    page.locator("#merge-btn").click()
    expect(page.locator("#merge-file")).to_be_visible(timeout=120_000)
    merged = list((app.outputs / "checkpoints").glob("*.safetensors"))
    assert len(merged) == 1
    sd_lora.load_pipeline(merged[0])  # loads as a plain model


def sd_lora_params(path: Path) -> dict:
    import json

    from PIL import Image

    return json.loads(Image.open(path).text.get("sd-lora", "{}"))
