"""The page's search controls in Debian's headless Chromium against a live ``pixfind serve``:
the "Not" field, the minimum score, "All copies" and its copy badges, "more like this" without
the picture itself; each checked against the JSON API's own answer for the same request.

Needs ``/usr/bin/chromium`` and the ``playwright`` package, as tests/test_web_browser.py does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import urlencode
from urllib.request import urlopen

import pytest

try:
    from test_web_browser import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS, card_paths, shoot, wait_for_results
    from web_support import LiveServer, build_index, make_gallery
except ImportError:  # tests/ is a package
    from tests.test_web_browser import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS, card_paths, shoot, wait_for_results
    from tests.web_support import LiveServer, build_index, make_gallery

pytestmark = pytest.mark.browser

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} not found: browser tests need Debian's chromium", allow_module_level=True)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Nine distinct pictures, and two exact copies of the first under copies/ (11 files)."""
    root = tmp_path_factory.mktemp("search-page") / "pictures"
    paths = make_gallery(root, count=8)
    (root / "copies").mkdir()
    for name in ("a.jpg", "b.jpg"):
        shutil.copyfile(paths[0], root / "copies" / name)
    return root


@pytest.fixture(scope="module")
def server(gallery: Path):
    db = gallery.parent / "index.db"
    build_index(db, gallery)
    live = LiveServer(db, gallery.parent)
    yield live
    live.stop()
    assert "Traceback" not in live.output, live.output


@pytest.fixture
def page(server: LiveServer):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1360, "height": 860})
        page.set_default_timeout(TIMEOUT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url)
        yield page
        browser.close()
        assert errors == []


def api(server: LiveServer, endpoint: str, **params: object) -> list[dict]:  # type: ignore[type-arg]
    with urlopen(f"{server.url.rstrip('/')}{endpoint}?{urlencode(params, doseq=True)}", timeout=30) as response:
        return json.loads(response.read())


def search(page, text: str) -> None:  # type: ignore[no-untyped-def]
    page.fill("#q", text)
    page.press("#q", "Enter")


def test_copies_not_field_and_min_score(page, server: LiveServer, gallery: Path) -> None:
    copies = {str(gallery / "copies" / "a.jpg"), str(gallery / "copies" / "b.jpg")}
    search(page, "sunset over the sea")
    assert wait_for_results(page, 9) == 9  # 11 files, one content held three times
    expected = api(server, "/api/search", q="sunset over the sea", k=24)
    assert card_paths(page) == [hit["path"] for hit in expected]
    badge = page.locator("#results a.card .copies")
    assert badge.count() == 1 and badge.inner_text() == "×3"
    (group,) = [hit for hit in expected if hit["copies"] == 3]
    assert {group["path"], *group["copy_paths"]} == copies | {str(gallery / "trips" / "landscape_00.jpg")}
    page.locator("#results a.card").nth(card_paths(page).index(group["path"])).click()
    assert "3 identical files" in page.inner_text("#viewer-copies")
    shoot(page, "web-copies.png")
    page.keyboard.press("Escape")

    page.check("#all-copies")
    assert wait_for_results(page, 11) == 11
    assert page.locator("#results a.card .copies").count() == 0
    assert "all=true" in page.url

    # "Not": the same ranking as the API's for the same words
    page.fill("#not", "night")
    page.press("#not", "Enter")
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('but not')")
    expected = api(server, "/api/search", q="sunset over the sea", k=24, all="true", **{"not": "night"})
    assert wait_for_results(page, 11) == 11
    assert card_paths(page) == [hit["path"] for hit in expected]
    assert "not=night" in page.url

    # minimum score: between the 4th and the 5th hit, so exactly four remain
    cut = round((expected[3]["score"] + expected[4]["score"]) / 2, 6)
    page.fill("#min-score", str(cut))
    page.press("#min-score", "Enter")
    assert wait_for_results(page, 4) == 4
    assert card_paths(page) == [hit["path"] for hit in expected[:4]]
    assert f"score ≥ {cut}" in page.inner_text("#status")
    assert f"min_score={cut}" in page.url
    shoot(page, "web-search-controls.png")

    # the address keeps the controls: a reload shows the same
    page.reload()
    assert wait_for_results(page, 4) == 4
    assert page.input_value("#not") == "night" and page.input_value("#min-score") == str(cut)
    assert page.is_checked("#all-copies")

    # a score outside [-1, 1]: the server's one-line reason, no results
    page.fill("#min-score", "2")
    page.press("#min-score", "Enter")
    page.wait_for_selector("#error:not([hidden])")
    assert "between -1 and 1" in page.inner_text("#error")


def test_more_like_this_never_shows_the_picture_itself(page, server: LiveServer, gallery: Path) -> None:
    same = {str(gallery / "trips" / "landscape_00.jpg"), *(str(gallery / "copies" / n) for n in ("a.jpg", "b.jpg"))}
    search(page, "hills")
    wait_for_results(page, 9)
    chosen = next(path for path in card_paths(page) if path in same)  # the one shown for the three copies
    page.locator("#results a.card").nth(card_paths(page).index(chosen)).click()
    page.click("#more-like-this")
    page.wait_for_function("() => document.querySelector('#status').textContent.includes(' like ')")
    assert wait_for_results(page, 9) == 9  # 8 other pictures, and the two other copies as one
    shown = card_paths(page)
    assert chosen not in shown
    assert shown == [hit["path"] for hit in api(server, "/api/similar", path=chosen, k=24)]
    assert shown[0] in same and page.locator("#results a.card").first.locator(".copies").inner_text() == "×2"
