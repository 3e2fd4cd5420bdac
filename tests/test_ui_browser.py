"""The app in a real browser: Debian's Chromium driven by Playwright (settings in DESIGN.md). The page loads, a weight
slider is moved, Generate is clicked, and an image appears. The screenshot is kept in test-artifacts/."""

from __future__ import annotations

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
    if not CHROMIUM.is_file():
        pytest.skip("Debian's chromium is not installed (/usr/bin/chromium): apt-get install -y chromium")
    pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
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
