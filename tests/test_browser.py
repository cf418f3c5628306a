"""The Gradio UI in a real browser: Debian's chromium driven by Playwright, against ``ferkit serve``.

Needs ``apt-get install chromium`` and ``pip install playwright`` (never ``playwright install``: the
system chromium is used); skipped when either is missing. Screenshots go to a temporary folder, or with
``FERKIT_SCREENSHOT_DIR=reports`` to the README's ``reports/app_screenshot.png`` and ``app_webcam_screenshot.png``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")

from appserver import running_server  # noqa: E402

from ferkit.app import ASSETS_DIR  # noqa: E402
from ferkit.data import CLASSES  # noqa: E402

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("FERKIT_CHROMIUM", "/usr/bin/chromium")
TIMEOUT_MS = 60_000

if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


def write_y4m(image: Path, out: Path, frames: int = 10) -> Path:
    """A short raw video (YUV4MPEG2, 4:2:0) of a still photo, for chromium's fake webcam."""
    import numpy as np
    from PIL import Image

    ycbcr = np.asarray(Image.open(image).convert("RGB").convert("YCbCr"))
    h, w = ycbcr.shape[:2]
    y, cb, cr = (ycbcr[..., i] for i in range(3))
    frame = b"FRAME\n" + y.tobytes() + cb[::2, ::2].tobytes() + cr[::2, ::2].tobytes()
    out.write_bytes(f"YUV4MPEG2 W{w} H{h} F5:1 Ip A1:1 C420jpeg\n".encode() + frame * frames)
    return out


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A running server and a browser, shared by the module's tests; each test opens a page of its own."""
    camera = write_y4m(ASSETS_DIR / "faces_group.jpg", tmp_path_factory.mktemp("camera") / "faces.y4m")
    with running_server("--log-level", "warning") as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-video-capture={camera}",
            ],
        )
        try:
            yield browser, url
        finally:
            browser.close()


@pytest.fixture
def page(site):
    """A fresh page of the app: one test's tab or photo no longer carries over to the next."""
    browser, url = site
    context = browser.new_context(viewport={"width": 1280, "height": 900}, permissions=["camera"])
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url + "/", wait_until="domcontentloaded")
        yield page
    finally:
        context.close()


def test_header_shows_model(page):
    header = page.locator("#ferkit-header")
    sync_api.expect(header).to_contain_text("facial expression recognition", timeout=TIMEOUT_MS)
    sync_api.expect(header).to_contain_text("Model")
    sync_api.expect(header).to_contain_text("PrivateTest accuracy")


def test_example_click_runs_prediction(page):
    page.get_by_text("astronaut", exact=True).first.click()
    summary = page.locator("#ferkit-summary")
    sync_api.expect(summary).to_contain_text("1 face", timeout=TIMEOUT_MS)
    sync_api.expect(page.locator("#ferkit-face-1")).to_be_visible()
    sync_api.expect(page.locator("#ferkit-face-2")).to_be_hidden()


@pytest.fixture
def shots(tmp_path) -> Path:
    """Where screenshots go: FERKIT_SCREENSHOT_DIR (to refresh the README's), else a temporary folder, so
    that running the tests leaves the checkout as it was."""
    folder = Path(os.environ.get("FERKIT_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_upload_shows_every_face_and_scores(page, shots):
    page.locator("#ferkit-photo input[type=file]").set_input_files(str(ASSETS_DIR / "faces_group.jpg"))
    summary = page.locator("#ferkit-summary")
    sync_api.expect(summary).to_contain_text("4 faces", timeout=TIMEOUT_MS)
    sync_api.expect(page.locator("#ferkit-result img")).to_be_visible()
    for i in range(1, 5):
        panel = page.locator(f"#ferkit-face-{i}")
        sync_api.expect(panel).to_be_visible()
        sync_api.expect(panel).to_contain_text(f"Face {i}")
        for cls in CLASSES:  # all 7 probabilities of every face
            sync_api.expect(panel).to_contain_text(cls)
    sync_api.expect(page.locator("#ferkit-face-5")).to_be_hidden()
    text = summary.inner_text()
    assert any(cls in text for cls in CLASSES)
    page.wait_for_timeout(500)  # let the result image finish painting
    page.screenshot(path=str(shots / "app_screenshot.png"), full_page=True)
    assert (shots / "app_screenshot.png").stat().st_size > 10_000


def test_a_bad_upload_is_named_as_the_api_names_it(page, tmp_path):
    """Gradio decoded the upload before ferkit saw it and showed its own internal error (with server paths)."""
    fake = tmp_path / "notes.jpg"
    fake.write_text("these are notes, not a photo")
    page.locator("#ferkit-photo input[type=file]").set_input_files(str(fake))
    sync_api.expect(page.locator("#ferkit-summary")).to_contain_text("Not an image file", timeout=TIMEOUT_MS)
    assert page.get_by_text("Could not preprocess").count() == 0


def test_live_webcam_stream(page, shots):
    """The streaming tab on chromium's fake camera, which plays the four-faces photo."""
    page.get_by_role("tab", name="Webcam (live)").click()
    page.get_by_text("Click to Access Webcam").click()
    page.get_by_role("button", name="capture photo").click()  # starts streaming
    scores = page.locator("#ferkit-cam-scores")
    sync_api.expect(scores).to_contain_text("Largest face:", timeout=TIMEOUT_MS)
    for cls in CLASSES:
        sync_api.expect(scores).to_contain_text(cls)
    sync_api.expect(page.locator("#ferkit-cam-result img")).to_be_visible()
    page.screenshot(path=str(shots / "app_webcam_screenshot.png"), full_page=True)
