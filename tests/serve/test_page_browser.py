"""The page in a real browser: headless Chromium from the system packages, driven by Selenium through the
system chromedriver (nothing is downloaded). The server runs on 127.0.0.1 with tiny local weights.

Screenshots of each view for docs/serving.md: ``KPRPE_PAGE_SCREENSHOTS=docs/images pytest -m slow
tests/serve/test_page_browser.py`` (they show a random tiny model: the numbers mean nothing)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("dlib")
httpx = pytest.importorskip("httpx")
webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (in kprpe's dev extra)")

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from kprpe.serve import create_app  # noqa: E402

from .conftest import RunningServer  # noqa: E402
from .test_page import LIMITS, embedder, png, service_with_gallery  # noqa: E402, F401 - embedder: a fixture

pytestmark = pytest.mark.slow
INSTALL_HINT = "needs chromium and chromedriver: apt-get install -y chromium chromium-driver"
HOSTILE = "<img src=x onerror=window.pwned=1>.png"


def _executable(*names: str) -> str | None:
    return next((found for name in names if (found := shutil.which(name))), None)


@pytest.fixture(scope="module")
def browser():
    chromium = _executable("chromium", "chromium-browser")
    driver_path = _executable("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip(INSTALL_HINT)
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not download a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def photos(tmp_path_factory, astronaut) -> dict[str, Path]:
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    # lfw_subset's faces are 25x25, too small for dlib's detector: upscaled, the first one is found
    face = (np.clip(data.lfw_subset()[0], 0, 1) * 255).astype(np.uint8)
    face = np.asarray(Image.fromarray(face).resize((200, 200), Image.BICUBIC))
    paths = {"astronaut": folder / "astronaut.png", "lfw": folder / "lfw_0.png", "hostile": folder / HOSTILE}
    paths["astronaut"].write_bytes(png(astronaut))
    paths["lfw"].write_bytes(png(np.stack([face] * 3, axis=-1)))
    paths["hostile"].write_bytes(png(astronaut))
    return paths


@pytest.fixture(scope="module")
def page(embedder, tmp_path_factory):  # noqa: F811
    from kprpe.gallery.thumbnails import ThumbnailStore

    folder = tmp_path_factory.mktemp("g")
    service = service_with_gallery(
        embedder, folder, api_key="s3cret", thumbnails=ThumbnailStore(folder / "gallery.npz.thumbnails")
    )
    with RunningServer(create_app(service, LIMITS), LIMITS) as running:
        yield running


def screenshot(driver, name: str) -> None:
    folder = os.environ.get("KPRPE_PAGE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / f"page-{name}.png"))


def wait(driver, condition, seconds: float = 60):
    return WebDriverWait(driver, seconds, poll_frequency=0.1).until(lambda d: condition(d))


def error_text(driver) -> str:
    box = driver.find_element(By.ID, "error")
    return box.text if box.is_displayed() else ""


def test_verify_shows_boxes_keypoints_crops_and_the_decision(browser, page, photos):
    browser.get(page.url + "/")
    wait(browser, lambda d: d.find_element(By.ID, "server-info").text)
    browser.find_element(By.ID, "file-a").send_keys(str(photos["astronaut"]))
    browser.find_element(By.ID, "file-b").send_keys(str(photos["lfw"]))
    browser.find_element(By.ID, "verify-go").click()
    wait(browser, lambda d: d.find_element(By.ID, "verify-result").is_displayed() or error_text(d))
    assert error_text(browser) == ""
    with photos["astronaut"].open("rb") as a, photos["lfw"].open("rb") as b:
        expected = httpx.post(page.url + "/verify", files={"a": a, "b": b}, timeout=60).json()
    assert browser.find_element(By.ID, "verify-similarity").text == f"{expected['similarity']:.4f}"
    assert browser.find_element(By.ID, "verify-threshold").text == "0.3000"
    assert browser.find_element(By.ID, "verify-threshold-source").text == "default (test)"
    decision = "Same person" if expected["same"] else "Different people"
    assert browser.find_element(By.ID, "verify-decision").text == decision
    for slot in "ab":
        crop = browser.find_element(By.ID, f"crop-{slot}")
        size = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", crop)
        assert size == [112, 112]
        # the photo is drawn with the box (green) and keypoints: some pixels are the box's pure colour
        green = browser.execute_script(
            "const c = arguments[0], d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "let n = 0; for (let i = 0; i < d.length; i += 4)"
            " if (d[i] === 0x76 && d[i+1] === 0xff && d[i+2] === 3) n++; return n;",
            browser.find_element(By.ID, f"photo-{slot}"),
        )
        assert green > 50
    screenshot(browser, "verify")


def test_a_hostile_file_name_renders_as_text(browser, page, photos):
    browser.get(page.url + "/")
    browser.find_element(By.ID, "file-a").send_keys(str(photos["hostile"]))
    assert browser.find_element(By.ID, "name-a").text == HOSTILE
    assert browser.find_elements(By.CSS_SELECTOR, "img[src='x']") == []
    assert browser.execute_script("return window.pwned === undefined")


def test_a_refused_upload_shows_the_servers_one_line_error(browser, page, photos, tmp_path):
    not_a_photo = tmp_path / "notes.png"
    not_a_photo.write_text("just text")
    browser.get(page.url + "/")
    browser.find_element(By.ID, "file-a").send_keys(str(not_a_photo))
    browser.find_element(By.ID, "file-b").send_keys(str(photos["astronaut"]))
    browser.find_element(By.ID, "verify-go").click()
    wait(browser, error_text)
    message = error_text(browser)
    assert "field 'a': not an image" in message and "(415)" in message and "Traceback" not in message
    assert not browser.find_element(By.ID, "verify-result").is_displayed()


def test_bias_heat_map_follows_a_dragged_keypoint(browser, page, photos):
    browser.get(page.url + "/")
    browser.find_element(By.ID, "tab-kprpe").click()
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#kprpe-layer option")) == 2)
    browser.find_element(By.ID, "file-kprpe").send_keys(str(photos["astronaut"]))
    canvas = browser.find_element(By.ID, "kprpe-canvas")
    wait(browser, lambda d: canvas.get_attribute("data-bias") or error_text(d))
    assert error_text(browser) == ""
    screenshot(browser, "kprpe")
    before = json.loads(canvas.get_attribute("data-bias"))
    template = browser.find_element(By.ID, "rpe-canvas").get_attribute("data-bias")
    state = json.loads(canvas.get_attribute("data-state"))
    nose = state["points"][2]
    size = canvas.size["width"]
    # Selenium's offsets are from the element's centre
    start = (round((nose[0] - 0.5) * size), round((nose[1] - 0.5) * size))
    ActionChains(browser).move_to_element_with_offset(canvas, *start).click_and_hold().move_by_offset(
        40, 30).move_by_offset(20, 15).release().perform()
    wait(browser, lambda d: json.loads(canvas.get_attribute("data-state"))["points"][2] != nose)
    moved = json.loads(canvas.get_attribute("data-state"))["points"][2]
    assert moved[0] > nose[0] + 0.1 and moved[1] > nose[1] + 0.05  # dragged right and down
    wait(browser, lambda d: json.loads(canvas.get_attribute("data-bias")) != before)
    after = json.loads(canvas.get_attribute("data-bias"))
    assert np.abs(np.asarray(after) - np.asarray(before)).max() > 1e-3
    assert browser.find_element(By.ID, "rpe-canvas").get_attribute("data-bias") == template
    assert json.loads(canvas.get_attribute("data-state"))["query"] == state["query"]  # a drag is not a click
    # a click away from the keypoints picks the query patch: the top-left patch is 0
    corner = -size // 2 + 5
    ActionChains(browser).move_to_element_with_offset(canvas, corner, corner).click().perform()
    wait(browser, lambda d: json.loads(canvas.get_attribute("data-state"))["query"] == 0)


def test_enrol_needs_the_key_and_names_render_as_text(browser, page, photos):
    browser.get(page.url + "/")
    browser.find_element(By.ID, "tab-search").click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery-list li"))
    name = "<b>bold</b> & co"
    browser.find_element(By.ID, "enrol-identity").send_keys(name)
    browser.find_element(By.ID, "file-enrol").send_keys(str(photos["astronaut"]))
    browser.find_element(By.ID, "enrol-go").click()
    wait(browser, error_text)
    assert "API key" in error_text(browser) and "(401)" in error_text(browser)
    assert httpx.get(page.url + "/gallery").json()["identities"] == ["someone"]
    browser.find_element(By.ID, "api-key").send_keys("s3cret")
    browser.find_element(By.ID, "enrol-go").click()
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery-list li")) == 2 or error_text(d))
    assert error_text(browser) == ""
    labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#gallery-list .identity")]
    assert name in labels and browser.find_elements(By.CSS_SELECTOR, "#gallery-list b") == []
    browser.find_element(By.ID, "file-query").send_keys(str(photos["astronaut"]))
    browser.find_element(By.ID, "search-go").click()
    wait(browser, lambda d: d.find_element(By.ID, "search-result").is_displayed() or error_text(d))
    first = browser.find_element(By.CSS_SELECTOR, "#search-matches tbody tr td:nth-child(2)")
    assert first.text == name
    # the enrolled crop's thumbnail, loaded from the server, beside the match and in the gallery list
    cell = browser.find_element(By.CSS_SELECTOR, "#search-matches tbody tr td:nth-child(3)")
    thumbnail = cell.find_element(By.CSS_SELECTOR, "img.thumbnail")
    wait(browser, lambda d: d.execute_script("return arguments[0].complete", thumbnail))
    size = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", thumbnail)
    assert size == [56, 56] and thumbnail.get_attribute("alt") == f"enrolled face of {name}"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#gallery-list img.thumbnail")) == 1
    assert browser.find_elements(By.CSS_SELECTOR, "#search-matches b") == []  # the name stayed text
    screenshot(browser, "search")
