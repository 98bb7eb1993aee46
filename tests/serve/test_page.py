"""The web page at `/` in a real headless Chromium against the serve tier's app: a desk photo through the
progress bar to the image, a like counted in the A/B report, a 422 shown next to the photo, a two-mix
compare with product boxes, errors next to their fields, API keys (the page public, its calls carrying the
typed key, a 429 with its wait), at a phone width and a desktop width. Each state is screenshot into
build/screenshots/ (git-ignored) for a person to look at.

Needs Debian's `chromium` and `chromium-driver` (`make system-deps` installs them) and selenium. Every wait
is an explicit wait on the page's state with a generous bound; none is a fixed sleep."""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

from deployments.door.apikeys import key_hash, mint
from deskgen.paths import PROJECT_ROOT

from .conftest import deploy, deployment

pytestmark = [pytest.mark.serve, pytest.mark.browser]

SHOTS = PROJECT_ROOT / "build" / "screenshots"
#: Generous bounds: a wait ends as soon as its condition holds, so these only matter when something hangs.
LOAD_S = 60
GENERATE_S = 300
VIEWPORTS = {"desktop": (1280, 1000), "phone": (375, 812)}

#: Records every change of the progress bar and the status line, so the test sees each state the page
#: went through even when the steps are faster than any poll.
RECORD_PROGRESS = """
window.__seen = [];
const bar = document.getElementById('progress'), line = document.getElementById('status');
const note = () => window.__seen.push({value: bar.value, max: bar.max, status: line.textContent});
new MutationObserver(note).observe(bar, {attributes: true});
new MutationObserver(note).observe(line, {childList: true, characterData: true, subtree: true});
"""

def generation_answers(driver: Any, seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add to ``seen`` the JSON bodies of the page's successful ``/v1/generate`` answers, read from
    Chrome's own network log (DevTools ``Network.getResponseBody``): the page and its ``fetch`` are left
    untouched, so the test holds the boxes drawn against what the real locator answered."""
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] != "Network.responseReceived":
            continue
        response = message["params"]["response"]
        if (urlparse(response["url"]).path.startswith("/v1/generate") and response["status"] == 200
                and response["mimeType"] == "application/json"):  # fmt: skip
            body = driver.execute_cdp_cmd("Network.getResponseBody", {"requestId": message["params"]["requestId"]})
            seen.append(json.loads(body["body"]))
    return seen


def chrome(downloads: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        raise RuntimeError("no `chromium` / `chromedriver`: run `make system-deps` or `apt-get install chromium chromium-driver`")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--hide-scrollbars",
                "--force-device-scale-factor=1", "--lang=en-US"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False})
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver = chrome(tmp_path_factory.mktemp("downloads"))
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The page open in the browser at one viewport, with explicit waits on its state."""

    def __init__(self, driver: Any, url: str, viewport: str) -> None:
        self.driver, self.url, self.viewport = driver, url, viewport
        width, height = VIEWPORTS[viewport]
        driver.set_window_size(width, height)
        driver.get(url + "/")
        self.until(lambda d: d.execute_script("return document.body.dataset.ready") == "true", LOAD_S, "the page set-up")
        assert self.js("return document.getElementById('global-error').hidden"), self.text("global-error")

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def by_id(self, element_id: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.ID, element_id)

    def all(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, css))

    def text(self, element_id: str) -> str:
        return str(self.js("return document.getElementById(arguments[0]).textContent", element_id))

    def error_for(self, field: str) -> str:
        return str(self.js("return document.querySelector(`[data-error-for='${arguments[0]}']`).textContent", field))

    def until(self, condition: Callable[[Any], Any], timeout_s: float, what: str) -> Any:
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout_s, poll_frequency=0.1).until(condition)
        except TimeoutException:
            self.shot(f"timeout-{what.replace(' ', '-')}")
            logs = [e["message"] for e in self.driver.get_log("browser")][-20:]
            raise AssertionError(f"{self.viewport}: waited {timeout_s} s for {what}; status {self.text('status')!r}, "
                                 f"banner {self.text('global-error')!r}, console {logs}") from None  # fmt: skip

    @staticmethod
    def wait_for(check: Callable[[], bool], what: str) -> None:
        """Until ``check()`` holds (a change of the app's config applying), within :data:`LOAD_S`."""
        deadline = time.monotonic() + LOAD_S
        while not check():
            assert time.monotonic() < deadline, f"waited {LOAD_S} s for {what}"
            time.sleep(0.2)

    def generate(self) -> None:
        """Click Generate and wait until the run ends (the image, or an error)."""
        self.js("document.getElementById('run').dataset.phase = ''")
        self.by_id("generate").click()
        self.until(lambda d: self.js("return document.getElementById('run').dataset.phase") in ("done", "error"),
                   GENERATE_S, "the run to end")  # fmt: skip

    def choose_photo(self, path: Path) -> None:
        self.by_id("photo").send_keys(str(path))
        self.until(lambda d: path.name in self.text("photo-name"), LOAD_S, "the photo's preview")

    def set_value(self, element_id: str, value: str) -> None:
        field = self.by_id(element_id)
        field.clear()
        if value:
            field.send_keys(value)

    def shot(self, name: str) -> Path:
        """The whole page (beyond the window's height) as ``build/screenshots/<viewport>-<name>.png``."""
        size = self.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        png = self.driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip})
        path = SHOTS / f"{self.viewport}-{name}.png"
        path.write_bytes(base64.b64decode(png["data"]))
        return path

    def fits_the_width(self) -> bool:
        return bool(self.js("return document.documentElement.scrollWidth <= window.innerWidth"))


@pytest.fixture()
def photos(desk_photo: bytes, not_a_desk: bytes, tmp_path: Path) -> dict[str, Path]:
    """The serve tier's photos as files for the page's file input."""
    (tmp_path / "desk.jpg").write_bytes(desk_photo)
    (tmp_path / "not-a-desk.png").write_bytes(not_a_desk)
    return {"desk": tmp_path / "desk.jpg", "other": tmp_path / "not-a-desk.png"}


def likes(client: httpx.Client, experiment_id: str) -> float:
    report = client.get(f"/v1/experiments/{experiment_id}")
    assert report.status_code == 200, report.text
    return float(sum(arm["rates"]["like"]["events"] for arm in report.json()["arms"]))


# -- the page is served --------------------------------------------------------------------------


def test_the_page_and_its_assets_are_served_public_and_out_of_the_api_document(client: httpx.Client) -> None:
    page = client.get("/", headers={"Accept": "text/html"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), page.text
    assert '<script src="/ui/app.js" defer></script>' in page.text and "/ui/style.css" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from outside: no CDN, no fonts
    for asset, media_type in (("app.js", "javascript"), ("style.css", "text/css")):
        answer = client.get(f"/ui/{asset}")
        assert answer.status_code == 200 and media_type in answer.headers["content-type"], asset
        assert "http://" not in answer.text and "https://" not in answer.text and "@import" not in answer.text, asset
    missing = client.get("/ui/nothing-here.js")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not any(p.startswith("/ui") for p in paths)


# -- a desk photo, start to finish ------------------------------------------------------------------


@pytest.mark.parametrize("viewport", list(VIEWPORTS))
def test_a_desk_photo_goes_through_every_step_to_the_image_and_a_like_counts(
    serve_app: dict[str, Any], browser: Any, client: httpx.Client, photos: dict[str, Path], viewport: str
) -> None:
    page = Page(browser, serve_app["url"], viewport)
    experiment = client.get("/v1/experiments").json()["current"]
    assert page.by_id("report-link").get_attribute("href").endswith(f"/v1/experiments/{experiment}")
    assert page.by_id("mix").get_attribute("value") == ""  # the A/B split picks: the like counts for an arm
    page.shot("1-ready")
    page.choose_photo(photos["desk"])
    page.js(RECORD_PROGRESS)
    page.generate()

    # Every state, in order: the page's own record, and what the test saw the bar and status line do.
    default_steps = deployment(serve_app["config"], "Ingress")["user_config"]["default_steps"]
    states = page.js("return document.getElementById('run').dataset.states").split()
    assert states == ["classified", "captioned", "started", *(f"step:{i}/{default_steps}" for i in range(1, default_steps + 1)), "done"]
    seen = page.js("return window.__seen")
    values = [s["value"] for s in seen]
    assert values == sorted(values) and values[-1] == seen[-1]["max"] == 3 + default_steps + 1, seen
    assert {1, 2, 3, *(3 + i for i in range(1, default_steps + 1))} <= set(values), seen
    statuses = " | ".join(dict.fromkeys(s["status"] for s in seen))
    for fragment in ("Classified: desk score", "Captioned", "Generating with", f"Step {default_steps} of {default_steps}", "Done in"):
        assert fragment in statuses, statuses

    # The details and the image with its mix, seed and timings.
    assert float(page.text("gate-score").split()[0]) >= 0.5
    assert len(page.all("#captions li")) >= 2 and len(page.all("#keywords li")) >= 1 and "desk" in page.text("prompt-used")
    page.until(lambda d: page.js("const i = document.querySelector('#result img.generated'); return i && i.complete && i.naturalWidth"),
               LOAD_S, "the image to load")  # fmt: skip
    assert page.js("return document.querySelector('#result img.generated').naturalWidth") == 64
    facts = page.js("return document.querySelector('#result .facts').textContent")
    assert "A/B arm" in facts and "seed" in facts and "total" in facts, facts
    assert page.all("#result a[download]")[0].get_attribute("href").startswith("blob:")
    assert page.fits_the_width(), "the page scrolls sideways"
    page.shot("2-done")

    # A like, counted in the experiment's report.
    before = likes(client, experiment)
    page.all("#result button.like")[0].click()
    page.until(lambda d: page.js("return document.querySelector('#result .feedback-note').dataset.recorded") == "like",
               LOAD_S, "the like to be recorded")  # fmt: skip
    assert page.js("return document.querySelector('#result .feedback-note').textContent") == "like: recorded"
    assert likes(client, experiment) == before + 1
    page.shot("3-liked")
    # Download is feedback too (the file itself is the blob the page already holds).
    page.all("#result a[download]")[0].click()
    page.until(lambda d: page.js("return document.querySelector('#result .feedback-note').dataset.recorded") == "download",
               LOAD_S, "the download to be recorded")  # fmt: skip
    # The report page itself, as the link opens it (a browser asks for HTML).
    page.driver.get(page.by_id("report-link").get_attribute("href"))
    page.until(lambda d: experiment in d.page_source, LOAD_S, "the report page")
    page.shot("4-report")


def test_a_photo_that_is_not_a_desk_shows_the_422_with_its_score_next_to_the_photo(
    serve_app: dict[str, Any], browser: Any, photos: dict[str, Path]
) -> None:
    page = Page(browser, serve_app["url"], "phone")
    page.choose_photo(photos["other"])
    page.by_id("generate").click()
    page.until(lambda d: page.error_for("image"), GENERATE_S, "the error next to the photo")
    message = page.error_for("image")
    assert message.startswith("[not_a_desk_setup]") and "does not look like a desk setup" in message, message
    assert re.search(r"score 0\.\d{4}", message) and "threshold 0.5" in message, message
    assert page.by_id("photo").get_attribute("aria-invalid") == "true"
    assert page.js("return document.getElementById('global-error').hidden")
    assert page.js("return document.getElementById('run').dataset.phase") == "error"
    assert page.fits_the_width()
    page.shot("5-not-a-desk")


def test_two_mixes_compared_side_by_side_with_the_same_seed_and_their_product_boxes(
    serve_app: dict[str, Any], browser: Any, photos: dict[str, Path]
) -> None:
    page = Page(browser, serve_app["url"], "desktop")
    page.choose_photo(photos["desk"])
    page.set_value("seed", "42")
    for box in page.all("#compare-mixes input[type=checkbox]"):
        if box.is_selected() != (box.get_attribute("value") in ("dalle_only", "ott_3d")):
            box.click()
    # Name the products, so that the real locator (threshold 0 in this tier: its best box per product
    # counts as found) answers with boxes for each, deterministically.
    page.set_value("products", "monitor, keyboard")
    page.driver.get_log("performance")  # what came before is not this comparison's
    page.by_id("compare").click()
    page.until(lambda d: "Compared 2 mixes" in page.text("compare-status"), GENERATE_S, "two images")
    figures = page.all("#compare-grid figure.result")
    assert len(figures) == 2 and not page.all("#compare-grid figure.failed")
    mixes = [f.find_element("css selector", ".mix-id").text for f in figures]
    assert mixes[0].startswith("dalle_only = dalle:1.0") and mixes[1].startswith("ott_3d = 3d:0.5+ott:0.7"), mixes
    assert [f.find_element("css selector", ".seed").text for f in figures] == ["42", "42"]
    page.until(lambda d: page.js("return [...document.querySelectorAll('#compare-grid img')].every(i => i.complete && i.naturalWidth === 64)"),
               LOAD_S, "both images to load")  # fmt: skip
    # The boxes: each found instance of each real answer drawn, labelled, placed from its box_normalized.
    seen: list[dict[str, Any]] = []
    page.until(lambda d: len(generation_answers(d, seen)) == 2, LOAD_S, "both answers seen on the network")
    by_mix = {a["mix"]["id"]: a["products"] for a in seen}
    answers = [by_mix[m.split(" = ", 1)[1].split()[0]] for m in mixes]
    for products in answers:
        assert products["status"] == "ok" and products["source"] == "request", products
        assert [(i["product"], i["found"]) for i in products["items"]] == [("monitor", True), ("keyboard", True)], products
    for figure, products in zip(figures, answers, strict=True):
        wanted = [(item["product"], instance) for item in products.get("items", []) if item["found"]
                  for instance in item["instances"]]  # fmt: skip
        drawn = figure.find_elements("css selector", ".box")
        labels = [page.js("return arguments[0].textContent", b) for b in drawn]
        assert labels == [f"{name} {instance['score']:.2f}" for name, instance in wanted]
        for box, (_, instance) in zip(drawn, wanted, strict=True):
            x0, y0, x1, _ = instance["box_normalized"]
            style = page.js("const s = arguments[0].style; return [s.left, s.top, s.width]", box)
            assert [float(v.rstrip("%")) for v in style] == pytest.approx([x0 * 100, y0 * 100, (x1 - x0) * 100], abs=1e-6)
    first = answers[0]["items"][0]["instances"][0]
    assert page.js("return arguments[0].querySelector('.box span').textContent", figures[0]) == f"monitor {first['score']:.2f}"
    page.shot("6-compare")


def test_errors_show_next_to_their_field_and_adhoc_mixes_are_set_by_keyboard(
    serve_app: dict[str, Any], browser: Any, photos: dict[str, Path]
) -> None:
    from selenium.webdriver.common.keys import Keys

    page = Page(browser, serve_app["url"], "phone")
    # Nothing chosen yet: the page says so next to the photo, without a request.
    page.by_id("generate").click()
    page.until(lambda d: page.error_for("image"), LOAD_S, "the missing photo")
    assert "choose a desk photo" in page.error_for("image")
    page.choose_photo(photos["desk"])
    # An ad-hoc mix, from the keyboard: the sliders start at the default mix's weights; `ott` to 0 (Home),
    # then 14 steps of 0.05 up.
    assert page.text("mix-spec") == "A/B split"
    page.by_id("w-ott").send_keys(Keys.HOME)
    for _ in range(14):
        page.by_id("w-ott").send_keys(Keys.ARROW_RIGHT)
    assert page.by_id("mix").get_attribute("value") == "__custom"
    assert page.text("mix-spec") == "3d:0.4+dalle:0.6+ott:0.7"
    # The server's 400 lands next to the field it names.
    page.set_value("steps", "999")
    page.by_id("generate").click()
    page.until(lambda d: page.error_for("steps"), LOAD_S, "the error next to steps")
    assert page.error_for("steps").startswith("[invalid_parameter]") and "999" in page.error_for("steps")
    page.shot("7-bad-steps")
    # A product name over the limit: the 400 names `products.1`, shown next to the products field.
    page.set_value("steps", "")
    page.set_value("products", "monitor, " + "x" * 49)
    page.by_id("generate").click()
    page.until(lambda d: page.error_for("products"), LOAD_S, "the error next to products")
    assert page.error_for("products").startswith("[invalid_parameter]") and "products.1" in page.error_for("products")
    # Corrected, the ad-hoc mix generates (and the errors are gone), with the products asked for boxed.
    page.set_value("products", "monitor, mug")
    page.generate()
    assert page.js("return document.getElementById('run').dataset.phase") == "done", page.text("status")
    facts = page.js("return document.querySelector('#result .mix-id').textContent")
    assert facts == "3d:0.4+dalle:0.6+ott:0.7 (request)", facts
    assert page.error_for("steps") == "" and page.error_for("products") == ""
    labels = page.js("return [...document.querySelectorAll('#result .box span')].map((s) => s.textContent.split(' ')[0])")
    assert labels and set(labels) == {"monitor", "mug"}, labels
    assert page.fits_the_width()
    page.shot("8-adhoc-done")


def test_with_api_keys_the_page_stays_public_its_calls_carry_the_typed_key_and_a_429_shows_the_wait(
    serve_app: dict[str, Any], browser: Any, client: httpx.Client
) -> None:
    from selenium.webdriver.common.keys import Keys

    key = mint()
    keyed = copy.deepcopy(serve_app["config"])
    # A burst for the page's loads and a generation or two, then one request every 2 minutes: a 429 comes.
    deployment(keyed, "Ingress")["user_config"]["api_keys"] = [
        {"name": "page", "sha256": key_hash(key), "requests_per_minute": 0.5, "burst": 10}
    ]
    deploy(keyed)
    try:
        Page.wait_for(lambda: client.get("/v1/limits").status_code == 401, "the key to apply")
        # The page itself is public; its API calls are refused until a key is typed, and it says so there.
        page = Page(browser, serve_app["url"], "desktop")
        message = page.error_for("Authorization")
        assert message.startswith("[unauthorized]") and "API key is required" in message, message
        assert page.js("return document.getElementById('access').open")
        page.shot("9-key-required")
        page.by_id("api-key").send_keys(key + Keys.TAB)
        page.until(lambda d: len(page.all("#mix option")) > 2 and not page.error_for("Authorization"), LOAD_S, "the mixes with the key")
        # Kept for this tab only: there after a reload, never in localStorage.
        page.driver.refresh()
        page.until(lambda d: page.js("return document.body.dataset.ready") == "true", LOAD_S, "the reload")
        assert page.by_id("api-key").get_attribute("value") == key and not page.error_for("Authorization")
        assert not page.js("return Object.values(localStorage).some(v => v.includes(arguments[0]))", key)
        # A prompt, with the key, through its progress to the image.
        page.by_id("mode-prompt").click()
        page.set_value("prompt", "a tidy desk by a window")
        page.generate()
        assert page.js("return document.getElementById('run').dataset.phase") == "done", page.text("status")
        assert page.js("return document.getElementById('run').dataset.states").split() == ["started", "step:1/2", "step:2/2", "done"]
        # Over the key's rate: the 429's message and its Retry-After wait, in the banner (it names no field).
        for _ in range(10):
            page.generate()
            if page.js("return document.getElementById('run').dataset.phase") == "error":
                break
        banner = page.text("global-error")
        assert re.fullmatch(r"\[rate_limited\] API key 'page' is over its limit of 0\.5 requests per minute: .* Try again in \d+ s\.", banner), banner
        page.shot("10-rate-limited")
    finally:
        browser.execute_script("sessionStorage.clear()")
        deploy(serve_app["config"])
        Page.wait_for(lambda: client.get("/v1/limits").status_code == 200, "the open config to come back")
