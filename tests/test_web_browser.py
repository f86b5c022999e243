"""End to end: a live ``pixfind serve`` on 127.0.0.1 driven by Debian's headless Chromium.

Needs ``/usr/bin/chromium`` (``apt-get install chromium``) and the ``playwright`` Python package
(``.ci/browser-setup.sh`` installs both; Playwright's own browser download is not used). Saves
screenshots under ``.artifacts/``; with ``PIXFIND_UPDATE_SCREENSHOT=1`` also ``docs/screenshot.png``
(search by an example image; the model has random weights, so text queries rank at random while
image-to-image similarity still follows colour and layout).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest

try:
    from web_support import REPO, LiveServer, build_index, make_gallery
except ImportError:  # tests/ is a package
    from tests.web_support import REPO, LiveServer, build_index, make_gallery

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("PIXFIND_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = REPO / ".artifacts"
TIMEOUT_MS = 30_000

if not CHROMIUM.exists():
    pytest.skip(
        f"{CHROMIUM} not found: browser tests need Debian's chromium (apt-get install chromium, "
        "or run .ci/browser-setup.sh)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("browser") / "pictures"
    make_gallery(root, count=18)
    return root


@pytest.fixture(scope="module")
def server(gallery: Path):
    db = gallery.parent / "index.db"
    build_index(db, gallery)
    live = LiveServer(db, gallery.parent)
    yield live
    live.stop()
    assert "Traceback" not in live.output, live.output


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server: LiveServer):
    context = browser.new_context(viewport={"width": 1360, "height": 860}, device_scale_factor=1)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on(
        "requestfailed",
        lambda req: None if "ABORTED" in (req.failure or "") else errors.append(f"request failed: {req.url}"),
    )
    page.goto(server.url)
    yield page
    context.close()
    assert not [e for e in errors if "400" not in e], errors  # a 400 is expected in the bad-upload test


def wait_for_results(page, count: int | None = None) -> int:
    """Wait until the grid shows hits with every thumbnail loaded; return how many."""
    page.wait_for_function(
        """(count) => {
            const cards = document.querySelectorAll('#results a.card');
            const loaded = document.querySelectorAll('#results a.card img.loaded');
            return cards.length > 0 && loaded.length === cards.length && (count === null || cards.length === count);
        }""",
        arg=count,
    )
    return page.locator("#results a.card").count()


def card_paths(page) -> list[str]:
    return page.locator("#results a.card").evaluate_all("cards => cards.map(c => c.title)")


def shoot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    target = ARTIFACTS / name
    page.screenshot(path=str(target), animations="disabled")
    return target


def test_text_search_viewer_and_more_like_this(page, gallery: Path) -> None:
    assert page.title() == "pixfind"
    assert page.locator("#empty").is_visible()
    page.wait_for_function("() => document.querySelector('#info').textContent.includes('19 pictures indexed')")

    page.fill("#q", "sunset over the sea")
    page.press("#q", "Enter")
    shown = wait_for_results(page)
    assert shown == 19  # every picture; the page asks for 24 by default
    assert page.locator("#empty").is_hidden()
    assert "19 pictures for" in page.inner_text("#status")
    assert "sunset over the sea" in page.inner_text("#status")
    assert "q=sunset+over+the+sea" in page.url
    scores = [float(s) for s in page.locator("#results .score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True)
    assert all(Path(p).is_relative_to(gallery) for p in card_paths(page))
    names = page.locator("#results .name").all_inner_texts()
    assert names[0] == Path(card_paths(page)[0]).name
    shoot(page, "web-results.png")

    # click a hit: the viewer shows the full image and its details
    third = card_paths(page)[2]
    page.locator("#results a.card").nth(2).click()
    viewer = page.locator("#viewer")
    assert viewer.is_visible()
    page.wait_for_function("() => document.querySelector('#viewer-img').classList.contains('full')")
    assert page.inner_text("#viewer-name") == Path(third).name
    assert page.inner_text("#viewer-path") == str(Path(third).parent)
    assert "KB" in page.inner_text("#viewer-size")
    assert re.fullmatch(r"\d+ × \d+ px", page.inner_text("#viewer-dims"))
    assert page.inner_text("#viewer-rank") == "#3 of 19"
    natural = page.eval_on_selector("#viewer-img", "img => [img.naturalWidth, img.naturalHeight]")
    from PIL import Image

    with Image.open(third) as original:
        assert natural == list(original.size)  # the original, not the thumbnail
    shoot(page, "web-viewer.png")
    page.keyboard.press("ArrowRight")
    page.wait_for_function("() => document.querySelector('#viewer-rank').textContent === '#4 of 19'")

    # more like this: every other picture, never the picture itself
    fourth = card_paths(page)[3]
    page.click("#more-like-this")
    assert viewer.is_hidden()
    page.wait_for_function("() => document.querySelector('#status').textContent.includes(' like ')")
    assert wait_for_results(page) == 18
    assert fourth not in card_paths(page)
    assert Path(fourth).name in page.inner_text("#status")
    assert "like=" in page.url

    # back to the text results
    page.go_back()
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('pictures for')")
    assert page.input_value("#q") == "sunset over the sea"


def test_upload_drop_and_bad_upload(page, gallery: Path, tmp_path: Path) -> None:
    target = gallery / "garden" / "flowers_05.jpg"
    page.set_input_files("#file-input", str(target))
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('flowers_05.jpg')")
    wait_for_results(page)
    assert card_paths(page)[0] == str(target)
    assert float(page.locator("#results .score").first.inner_text()) > 0.99
    assert page.locator("#status img.query-thumb").count() == 1
    page.select_option("#k", "12")  # a new result count re-runs the same image search
    assert wait_for_results(page, 12) == 12
    assert card_paths(page)[0] == str(target)
    page.select_option("#k", "24")
    assert wait_for_results(page, 19) == 19
    screenshot = shoot(page, "web-upload.png")
    if os.environ.get("PIXFIND_UPDATE_SCREENSHOT") == "1":  # the one in the README
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copyfile(screenshot, REPO / "docs" / "screenshot.png")

    # drop an image onto the page
    dropped = gallery / "trips" / "landscape_07.jpg"
    page.goto(page.url)  # fresh page
    data = page.evaluate_handle(
        """async (url) => {
            const blob = await (await fetch(url)).blob();
            const transfer = new DataTransfer();
            transfer.items.add(new File([blob], 'dropped.jpg', { type: 'image/jpeg' }));
            return transfer;
        }""",
        f"/api/image?path={quote(str(dropped))}",
    )
    page.dispatch_event("main", "dragenter", {"dataTransfer": data})
    assert page.locator("#dropzone").is_visible()
    page.dispatch_event("main", "drop", {"dataTransfer": data})
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('dropped.jpg')")
    wait_for_results(page)
    assert page.locator("#dropzone").is_hidden()
    assert card_paths(page)[0] == str(dropped)

    # a file that is not an image: a clear message, no results
    page.set_input_files(
        "#file-input", files=[{"name": "fake.jpg", "mimeType": "image/jpeg", "buffer": b"not a picture at all"}]
    )
    page.wait_for_selector("#error:not([hidden])")
    assert "not a usable image" in page.inner_text("#error")
    assert page.locator("#results a.card").count() == 0


def test_an_image_over_the_upload_limit_is_refused_before_it_is_sent(page) -> None:
    page.wait_for_function("() => document.querySelector('#info').textContent.includes('indexed')")
    posted: list[str] = []
    page.on("request", lambda request: posted.append(request.url) if request.method == "POST" else None)
    big = b"\xff\xd8\xff" + b"\0" * (21 * 1024 * 1024)
    page.set_input_files("#file-input", files=[{"name": "huge.jpg", "mimeType": "image/jpeg", "buffer": big}])
    page.wait_for_selector("#error:not([hidden])")
    message = page.inner_text("#error")
    assert "huge.jpg is too large to search by" in message and "the limit is 20 MB)" in message, message
    assert posted == []


def test_result_count_and_folder_filter(page, gallery: Path) -> None:
    page.select_option("#k", "12")
    page.fill("#q", "flowers in a garden")
    page.press("#q", "Enter")
    assert wait_for_results(page, 12) == 12

    garden = gallery / "garden"
    page.fill("#under", str(garden))
    page.dispatch_event("#under", "change")
    expected = len(list(garden.iterdir()))
    assert wait_for_results(page, expected) == expected
    assert all(Path(p).parent == garden for p in card_paths(page))
    assert str(garden) in page.inner_text("#status")
    shoot(page, "web-folder.png")

    # "search in this folder" from the viewer, after clearing the filter
    page.click("#under-clear")
    wait_for_results(page, 12)
    first = card_paths(page)[0]
    page.locator("#results a.card").first.click()
    page.click("#viewer-folder")
    page.wait_for_function("(folder) => document.querySelector('#under').value === folder", arg=str(Path(first).parent))
    wait_for_results(page)
    assert all(Path(p).parent == Path(first).parent for p in card_paths(page))


def test_page_works_offline_and_from_a_shared_link(page, server: LiveServer) -> None:
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(server.url + "?q=night+sky&k=12")
    wait_for_results(page, 12)
    assert page.input_value("#q") == "night sky"
    assert requested and all(url.startswith(server.url) for url in requested), requested


def test_server_answers_concurrent_browsers(browser, server: LiveServer) -> None:
    contexts = [browser.new_context() for _ in range(4)]
    try:
        pages = [context.new_page() for context in contexts]
        for i, page in enumerate(pages):
            page.goto(f"{server.url}?q=picture+{i}&k=12")
        started = time.monotonic()
        for page in pages:
            page.set_default_timeout(TIMEOUT_MS)
            assert wait_for_results(page, 12) == 12
        assert time.monotonic() - started < 60
    finally:
        for context in contexts:
            context.close()


def test_api_docs_page_works_offline(page, server: LiveServer) -> None:
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(server.url + "docs")
    page.wait_for_selector(".opblock")
    summaries = page.locator(".opblock-summary-path").all_inner_texts()
    for path in ("/api/search", "/api/search/image", "/api/similar", "/api/info"):
        assert path in summaries
    assert requested and all(url.startswith(server.url) for url in requested), requested


def test_random_weights_are_said_once(page) -> None:
    """The test index has random weights (``--pretrained none``): the page says so, once."""
    page.wait_for_selector("#notice:not([hidden])")
    text = page.inner_text("#notice")
    assert "Random weights" in text and "--pretrained none" in text
    page.fill("#q", "a dog")
    page.press("#q", "Enter")
    wait_for_results(page)
    assert page.locator(".notice").count() == 1 and page.locator("#notice").is_visible()
    assert page.locator("#results").inner_text().count("Random weights") == 0
    shoot(page, "web-random-weights.png")


@pytest.fixture
def other_site():
    """A page served on another port of this host, as another local web app would be: another
    origin, the same *site* (so no private-network rule of the browser stands in the way)."""
    import http.server

    class EvilPage(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<!doctype html><title>another site</title>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), EvilPage)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{evil.server_address[1]}/"
    evil.shutdown()
    evil.server_close()


def test_pages_of_other_sites_cannot_probe_or_post(browser, server: LiveServer, gallery: Path, other_site: str) -> None:
    """Another site's page cannot tell which files are indexed through <img>, and its upload is
    refused. The browser hides those answers from the page (and from Playwright's events), so the
    server's status codes and the headers Chromium sent are read from the DevTools protocol."""
    from urllib.parse import urlsplit

    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        devtools = context.new_cdp_session(page)
        devtools.send("Network.enable")
        urls: dict[str, str] = {}
        sent: dict[str, dict[str, str]] = {}
        answered: dict[str, int] = {}
        devtools.on("Network.requestWillBeSent", lambda e: urls.__setitem__(e["requestId"], e["request"]["url"]))
        devtools.on(
            "Network.requestWillBeSentExtraInfo",
            lambda e: sent.__setitem__(e["requestId"], {k.lower(): v for k, v in e["headers"].items()}),
        )
        devtools.on(
            "Network.responseReceivedExtraInfo", lambda e: answered.__setitem__(e["requestId"], e["statusCode"])
        )
        page.goto(other_site)
        indexed = f"{server.url}api/thumb?path={quote(str(gallery / 'garden' / 'flowers_05.jpg'))}"
        missing = f"{server.url}api/thumb?path={quote(str(gallery / 'garden' / 'nothing.jpg'))}"
        loaded = page.evaluate(
            """(urls) => Promise.all(urls.map((url) => new Promise((done) => {
                const img = new Image();
                img.onload = () => done(true);
                img.onerror = () => done(false);
                img.src = url;
            })))""",
            [indexed, missing],
        )
        assert loaded == [False, False]  # the indexed file looks like the missing one
        page.evaluate(
            """async (url) => {
                const body = new FormData();
                body.append("file", new Blob([new Uint8Array(64)], { type: "image/png" }), "q.png");
                try { await fetch(url, { method: "POST", mode: "no-cors", body }); } catch { /* CORP */ }
            }""",
            f"{server.url}api/search/image",
        )
        deadline = time.monotonic() + 30
        ours = [rid for rid, url in urls.items() if url.startswith(server.url)]
        while time.monotonic() < deadline and not all(rid in answered for rid in ours):
            page.wait_for_timeout(100)
        statuses: dict[str, list[int]] = {}
        for rid in ours:
            assert sent[rid].get("sec-fetch-site") == "same-site", sent[rid]
            statuses.setdefault(urlsplit(urls[rid]).path, []).append(answered.get(rid, 0))
        assert statuses == {"/api/thumb": [403, 403], "/api/search/image": [403]}, statuses
    finally:
        context.close()


def test_photo_filters_narrow_the_results_and_stay_in_the_address(page, gallery: Path) -> None:
    """The gallery's files carry no EXIF: their date is their mtime (today), their camera none;
    the oracle is what make_gallery drew: 6 portrait flower JPEGs, 12 landscape JPEGs, 1 square PNG."""
    from datetime import date, timedelta

    today = date.today()
    page.fill("#q", "a garden")
    page.select_option("#type", "png")
    page.press("#q", "Enter")
    assert wait_for_results(page, 1) == 1
    assert [Path(p).name for p in card_paths(page)] == ["sunset_card.png"]
    assert "type=png" in page.url and "type png" in page.inner_text("#status")

    page.select_option("#type", "")
    page.select_option("#orientation", "portrait")
    assert wait_for_results(page, 6) == 6
    assert all(Path(p).name.startswith("flowers_") for p in card_paths(page))

    page.fill("#camera", "canon")
    page.dispatch_event("#camera", "change")
    page.wait_for_function("() => document.querySelector('#results .none') !== null")
    page.fill("#camera", "")
    page.dispatch_event("#camera", "change")
    assert wait_for_results(page, 6) == 6

    page.fill("#before", (today - timedelta(days=1)).isoformat())
    page.dispatch_event("#before", "change")
    page.wait_for_function("() => document.querySelector('#results .none') !== null")
    page.fill("#before", today.isoformat())
    page.dispatch_event("#before", "change")
    page.fill("#after", today.isoformat())
    page.dispatch_event("#after", "change")
    assert wait_for_results(page, 6) == 6
    assert f"after={today.isoformat()}" in page.url and "orientation=portrait" in page.url

    page.locator("#results a.card").first.click()
    assert page.inner_text("#viewer-taken").startswith(today.isoformat())
    assert "(file date)" in page.inner_text("#viewer-taken")
    assert page.inner_text("#viewer-camera") == "unknown"
    page.keyboard.press("Escape")

    # a shared link brings the filters back
    page.goto(page.url)
    assert wait_for_results(page, 6) == 6
    assert page.input_value("#orientation") == "portrait" and page.input_value("#after") == today.isoformat()
    shoot(page, "web-filters.png")

    bad = page.request.get(f"{page.url.split('?')[0]}api/search?q=x&after=2024-13-01")
    assert bad.status == 400 and "YYYY-MM-DD" in bad.json()["detail"]
