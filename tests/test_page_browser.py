"""The web page at `/`, driven in a real browser (headless Chromium through Selenium) against a real Serve app.

A person's path through it: paste a key, choose three photos of one person, protect them, see each beside
its original, download the zip (whose photos must be the originals' sizes, changed, within ε), delete the
job from the server. Then the refusals it must explain (a bad key from the server; too many photos before
anything is sent), and a phone-width layout with every control labelled and reachable by keyboard.

CAPRAY_PAGE_SCREENSHOT=path saves a screenshot of the page with its results there. docs/img/page.png is made
with the bundled sample photos, not the research faces (CAPRAY_PAGE_PHOTOS=capray/samples/astronaut).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import FACES, PROXY_MAX_REQUEST_BYTES

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.browser]

CHROMIUM = os.environ.get("CAPRAY_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = os.environ.get("CAPRAY_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
for _tool, _path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)):
    if not Path(_path).exists():
        pytest.skip(f"{_tool} not installed (apt-get install chromium chromium-driver): the page's browser test "
                    "needs it", allow_module_level=True)
pytest.importorskip("selenium", reason="selenium not installed (pip install selenium): the page's browser test "
                    "needs it")

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import JavascriptException, WebDriverException  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

APP = "capray-page-test"
KEY = "page-key-0123456789abcdef"
PHOTO_DIR = Path(os.environ.get("CAPRAY_PAGE_PHOTOS") or FACES / "set_A").resolve()
PHOTOS = sorted(PHOTO_DIR.glob("*.png"))[:3]
FIVE = sorted((FACES / "set_A").glob("*.png")) + sorted((FACES / "set_B").glob("*.png"))
JOB_WAIT_S = 600  # the tiny model on two CPU cores: a couple of minutes at most
WINDOW = (1280, 1000)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page_server(ray_cluster, tiny_model_dir, tmp_path_factory):
    """A Serve app of its own: one key, at most 4 photos, room for three 512×512 photos in one request."""
    if len(PHOTOS) < 3 or len(FIVE) < 5:
        pytest.skip(f"shared sample faces not present under {FACES}")
    from ray import serve

    from capray.config import TINY_MODEL_NOTE, load_config
    from capray.serve.app import app_from_config

    base = tmp_path_factory.mktemp("page-serve")
    keys_file = base / "keys"
    keys_file.write_text(f"{KEY}\n")
    cfg = load_config(preset="smoke", overrides={"serve": {
        "min_replicas": 1, "max_replicas": 1, "gpus_per_replica": 0, "cpus_per_replica": 1, "ingress_cpus": 0,
        "ingress_replicas": 1, "max_photos": 4, "max_request_bytes": PROXY_MAX_REQUEST_BYTES,
        "max_request_pixels": 1_000_000, "store": str(base / "store"), "api_keys_file": str(keys_file)}})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app_from_config(cfg), name=APP, route_prefix="/")
        yield {"url": f"http://127.0.0.1:{port}/", "key": KEY, "eps_255": round(cfg.attack.eps * 127.5),
               "note": TINY_MODEL_NOTE}
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("page-downloads")


@pytest.fixture(scope="module")
def driver(downloads):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={WINDOW[0]},{WINDOW[1]}", "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False,
                                              "safebrowsing.enabled": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # the driver's path given: Selenium Manager (which would go online for a driver) is never asked
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        browser.set_window_size(*WINDOW)
        # headless Chromium ignores the download prefs unless told again over CDP
        browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads),
                                                                "eventsEnabled": False})
        yield browser
    finally:
        browser.quit()


# -- driving the page -----------------------------------------------------------------------------------

def _open(driver, url: str) -> None:
    driver.get(url)
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.documentElement.dataset.ready"))


def _type(driver, element_id: str, text: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(text)


def _choose(driver, paths) -> None:
    """Set the file input as a person picking files would (Start over first: a `multiple` input adds to what
    it holds)."""
    driver.find_element(By.ID, "start-over").click()
    driver.find_element(By.ID, "photos").send_keys("\n".join(str(p) for p in paths))
    WebDriverWait(driver, 10).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#queue .queued")) == len(paths))


def _error_text(driver) -> str:
    box = driver.find_element(By.ID, "error")
    return box.text if box.is_displayed() else ""


def _count_requests(driver) -> None:
    """Count the requests the page makes from now on (window.__sent), to show that a refusal sent nothing."""
    driver.execute_script("""
        window.__sent = 0;
        const send = XMLHttpRequest.prototype.send;
        XMLHttpRequest.prototype.send = function (...a) { window.__sent += 1; return send.apply(this, a); };
        const f = window.fetch;
        window.fetch = (...a) => { window.__sent += 1; return f(...a); };""")


def _wait_results(driver, n: int) -> list:
    def settled(d):
        return len(d.find_elements(By.CSS_SELECTOR, "#results .result")) == n or _error_text(d)

    WebDriverWait(driver, JOB_WAIT_S, poll_frequency=1).until(settled)
    assert not _error_text(driver), f"the page showed an error: {_error_text(driver)}"
    # every photo drawn: the originals (object URLs of the files) and the protected ones (fetched with the key)
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))
    return driver.find_elements(By.CSS_SELECTOR, "#results .result")


def _wait_download(directory: Path, suffix: str, timeout: float = 60) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [p for p in directory.glob(f"*{suffix}") if p.stat().st_size > 0]
        partial = list(directory.glob("*.crdownload"))
        if done and not partial:
            return done[0]
        time.sleep(0.25)
    raise AssertionError(f"no {suffix} download in {directory}: {sorted(p.name for p in directory.iterdir())}")


def _check_narrow_layout(driver) -> None:
    """At 360 px the page does not scroll sideways, and each original/protected pair stacks."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": 360, "height": 740,
                                                                  "deviceScaleFactor": 1, "mobile": True})
    try:
        WebDriverWait(driver, 10).until(lambda d: d.execute_script("return window.innerWidth") == 360)
        widths = driver.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert widths[0] <= widths[1], f"horizontal scrolling at 360 px: scrollWidth {widths[0]} > {widths[1]}"
        stacked = driver.execute_script("""
            return [...document.querySelectorAll('#results .pair')].every(p => {
                const [a, b] = [...p.querySelectorAll('img')].map(i => i.getBoundingClientRect());
                return b.top >= a.bottom && b.right <= window.innerWidth + 0.5; });""")
        assert stacked, "the original/protected pairs do not stack at 360 px"
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def _save_screenshot(driver, path: str) -> None:
    """The top of the page at WINDOW, in 256 colours (a photo-heavy PNG is otherwise ~1 MB: docs keep it small)."""
    from PIL import Image

    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": WINDOW[0], "height": WINDOW[1],
                                                                  "deviceScaleFactor": 1, "mobile": False})
    try:
        driver.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
        png = driver.get_screenshot_as_png()
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    shot = Image.open(io.BytesIO(png)).convert("RGB")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    shot.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


def _array(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB")).astype(int)


# -- the tests ------------------------------------------------------------------------------------------

def test_protect_compare_download_and_delete(page_server, driver, downloads):
    import httpx

    url, eps = page_server["url"], page_server["eps_255"]
    _open(driver, url)
    banner = driver.find_element(By.ID, "tiny-model-banner")
    assert banner.is_displayed() and "NOT a protection" in banner.text and page_server["note"] in banner.text
    _type(driver, "api-key", page_server["key"])
    _choose(driver, PHOTOS)
    _type(driver, "identity", PHOTO_DIR.name)
    # WebP (lossless, like PNG): the options part reaches the server
    Select(driver.find_element(By.ID, "format")).select_by_value("webp")
    driver.find_element(By.ID, "protect").click()

    results = _wait_results(driver, len(PHOTOS))
    assert [r.get_attribute("data-index") for r in results] == [str(i) for i in range(len(PHOTOS))]
    for result, path in zip(results, PHOTOS):
        text = result.text
        assert path.name in text and "L∞" in text and "PSNR" in text and "SSIM" in text, text
        link = result.find_element(By.CSS_SELECTOR, "a[download]")
        assert link.get_attribute("download") == f"{path.stem}-protected.webp"
        assert link.get_attribute("href").startswith("blob:")
        alts = [img.get_attribute("alt") for img in result.find_elements(By.TAG_NAME, "img")]
        assert alts == [f"Original: {path.name}", f"Protected: {path.name}"]
    assert page_server["note"] in driver.find_element(By.ID, "result-notes").text  # the job's notes, shown
    bars = driver.execute_script("return [...document.querySelectorAll('#queue progress')].map(p => p.value)")
    assert bars == [1] * len(PHOTOS), bars  # each photo's own upload bar ran to the end
    assert "protected" in driver.find_element(By.ID, "status").text
    # the key lives in this tab's sessionStorage only
    assert driver.execute_script("return sessionStorage.getItem('capray.apiKey')") == page_server["key"]
    assert driver.execute_script("return [localStorage.length, document.cookie]") == [0, ""]
    job_id = driver.find_element(By.ID, "results-section").get_attribute("data-job-id")
    assert job_id

    if os.environ.get("CAPRAY_PAGE_SCREENSHOT"):
        _save_screenshot(driver, os.environ["CAPRAY_PAGE_SCREENSHOT"])
    _check_narrow_layout(driver)

    driver.find_element(By.ID, "download-zip").click()
    archive = _wait_download(downloads, ".zip")
    with zipfile.ZipFile(archive) as zf:
        names = sorted(n for n in zf.namelist() if n != "summary.json")
        assert "summary.json" in zf.namelist() and len(names) == len(PHOTOS), zf.namelist()
        for name, path in zip(names, PHOTOS):
            assert path.stem in name and name.endswith(".webp"), (name, path.name)
            clean, protected = _array(path.read_bytes()), _array(zf.read(name))
            assert protected.shape == clean.shape, name
            linf = int(np.abs(protected - clean).max())
            assert 0 < linf <= eps, (name, linf, eps)

    driver.find_element(By.ID, "delete-job").click()
    WebDriverWait(driver, 30).until(lambda d: "removed" in d.find_element(By.ID, "status").text or _error_text(d))
    assert not _error_text(driver)
    assert not driver.find_elements(By.CSS_SELECTOR, "#results .result")
    gone = httpx.get(f"{url}v1/jobs/{job_id}", headers={"Authorization": f"Bearer {page_server['key']}"})
    assert gone.status_code == 404, gone.text


def test_refusals_are_explained(page_server, driver):
    _open(driver, page_server["url"])
    # the server's refusal: a key it does not know
    _type(driver, "api-key", "not-a-key-at-all")
    _choose(driver, PHOTOS[:1])
    driver.find_element(By.ID, "protect").click()
    WebDriverWait(driver, 60).until(_error_text)
    assert "This API key was not accepted" in _error_text(driver)
    assert not driver.find_elements(By.CSS_SELECTOR, "#results .result")

    # the page's own: five photos where the server takes four — refused before anything is sent
    _type(driver, "api-key", page_server["key"])
    _choose(driver, FIVE[:5])
    _count_requests(driver)
    driver.find_element(By.ID, "protect").click()
    WebDriverWait(driver, 10).until(_error_text)
    message = _error_text(driver)
    assert "Too many photos" in message and "at most 4" in message and "Nothing was sent" in message, message
    assert driver.execute_script("return window.__sent") == 0


def test_phone_width_labels_and_keyboard(page_server, driver):
    import httpx

    from capray.serve import page

    resp = httpx.get(page_server["url"])
    assert resp.status_code == 200 and resp.headers["content-security-policy"] == page.CSP
    driver.get_log("browser")  # drop what earlier tests logged
    _open(driver, page_server["url"])
    _check_narrow_layout(driver)
    unlabelled = driver.execute_script("""
        return [...document.querySelectorAll('input, select, textarea')]
            .filter(e => e.type !== 'hidden')
            .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))
            .map(e => e.id || e.outerHTML);""")
    assert unlabelled == []
    # Tab from the top reaches every control, the file input (which opens the picker) included
    # key presses, not element.send_keys (which, on a file input, means a file name)
    keyboard = ActionChains(driver)
    keyboard.send_keys(Keys.TAB).perform()
    reached, zone_outline = [], None
    for _ in range(20):
        reached.append(driver.execute_script("return document.activeElement.id"))
        if reached[-1] == "photos":  # the focused (visually hidden) file input shows its focus on the drop zone
            zone_outline = driver.execute_script(
                "return getComputedStyle(document.getElementById('drop-zone')).outlineStyle")
        keyboard.send_keys(Keys.TAB).perform()
    assert {"api-key", "identity", "format", "photos", "protect", "start-over"} <= set(reached), reached
    assert zone_outline not in (None, "none"), zone_outline
    # photos dropped on the drop zone are taken as if chosen (a synthetic drop: WebDriver cannot drag files)
    dropped = driver.execute_script("""
        const dt = new DataTransfer();
        for (const n of ['a.png', 'b.png']) dt.items.add(new File([new Uint8Array(16)], n, {type: 'image/png'}));
        document.getElementById('drop-zone').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true,
                                                                                  cancelable: true}));
        return [document.querySelectorAll('#queue .queued').length, document.getElementById('photos').files.length];""")
    assert dropped == [2, 2]
    try:
        logs = driver.get_log("browser")
    except (WebDriverException, JavascriptException):  # a driver without the log endpoint: nothing to check
        logs = []
    refused = [e["message"] for e in logs if "Content Security Policy" in e["message"]]
    assert refused == [], refused  # the page works under its CSP: nothing it needs was blocked
