"""End to end, in Debian's headless Chromium: the page's duplicates view and its line about
``pixfind serve --watch``, on a live server watching a folder whose names are hostile HTML.

The browser setup is tests/test_web_browser.py's. The pictures are drawn and derived as in
tests/test_duplicates.py, whose threshold (0.998, for random weights) the view is given.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import draw_photo
from test_duplicates import THRESHOLD, derive_copies, drawn
from test_web_browser import TIMEOUT_MS, browser, shoot  # noqa: F401  (browser: a fixture)
from web_support import LiveServer

pytestmark = pytest.mark.browser

#: Names a page would run as HTML if it wrote them as markup.
HOSTILE_FOLDER = "<img src=x onerror=window.pwned=1> photos"
HOSTILE_FILE = "<img src=y onerror=window.pwned=2>.jpg"


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A folder with a picture, its four derived copies and a byte copy under a hostile name,
    and three unrelated pictures."""
    root = tmp_path_factory.mktemp("library")
    folder = root / HOSTILE_FOLDER
    group = derive_copies(drawn(folder, "beach.jpg", seed=11), folder, "beach")
    shutil.copyfile(folder / "beach.jpg", folder / HOSTILE_FILE)
    group.append(folder / HOSTILE_FILE)
    for seed in (1, 2, 3):
        drawn(folder, f"other_{seed}.jpg", seed)
    return {"root": root, "folder": folder, "group": {str(p) for p in group}}


@pytest.fixture(scope="module")
def server(watched: dict[str, object]):
    """``pixfind serve --watch FOLDER`` on an index that its first run makes."""
    root, folder = watched["root"], watched["folder"]
    assert isinstance(root, Path) and isinstance(folder, Path)
    live = LiveServer(root / "index.db", root, "--watch", str(folder))
    yield live
    live.stop()
    assert "Traceback" not in live.output, live.output


@pytest.fixture
def page(browser, server: LiveServer):  # noqa: F811
    context = browser.new_context(viewport={"width": 1360, "height": 900}, device_scale_factor=1)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.goto(server.url)
    yield page
    context.close()
    assert not errors, errors


def wait_until_indexed(page, count: int) -> None:
    page.wait_for_function(
        """async (count) => (await (await fetch('/api/info')).json()).images >= count""",
        arg=count,
        polling=500,
        timeout=300_000,  # the watch's first run loads the model on a shared machine
    )


def nothing_injected(page) -> None:
    assert page.evaluate("() => window.pwned") is None
    assert page.locator('img[src="x"], img[src="y"]').count() == 0


def test_the_duplicates_view_shows_the_group_with_names_as_text(page, watched: dict[str, object]) -> None:
    wait_until_indexed(page, 9)
    page.click("#view-duplicates")
    assert "view=duplicates" in page.url
    assert page.locator("#duplicates-view").is_visible() and page.locator("#empty").is_hidden()
    page.fill("#dupes-threshold", str(THRESHOLD))
    page.click("#dupes-start")
    page.wait_for_function("() => document.querySelector('#dupes-summary').textContent.includes('of duplicates')")
    summary = page.inner_text("#dupes-summary")
    assert summary.startswith("1 group of duplicates (6 pictures;"), summary
    assert "as it was at" in summary and "not in them" in summary  # the run's moment, said
    figures = page.locator(".dupe-group .dupe")
    assert figures.count() == 6
    shown = set(figures.locator("a.dupe-thumb").evaluate_all("links => links.map(a => a.title)"))
    assert shown == watched["group"]
    names = page.locator(".dupe-name").all_inner_texts()
    assert HOSTILE_FILE in names  # as text
    assert page.locator(".dupe-folder").first.inner_text().endswith("/" + HOSTILE_FOLDER)
    nothing_injected(page)
    largest = page.locator(".dupe.largest")
    assert largest.count() == 1 and largest.locator(".dupe-badge").inner_text() == "Largest"
    assert largest.locator(".dupe-dims").inner_text().startswith("640 × 480 · ")
    assert page.locator(".dupe").nth(5).locator(".dupe-dims").inner_text() != "640 × 480"
    same = page.locator(".dupe:has(.dupe-same) .dupe-name").all_inner_texts()  # byte copies of the largest
    assert sorted(same) == sorted({"beach.jpg", "beach_copy.jpg", HOSTILE_FILE} - {names[0]}), (same, names)
    page.wait_for_function("() => document.querySelectorAll('.dupe img.loaded').length === 6")
    shoot(page, "web-duplicates.png")

    # a reload shows the finished run again; a search leaves the view
    page.reload()
    page.wait_for_function("() => document.querySelectorAll('.dupe-group').length === 1")
    assert page.input_value("#dupes-threshold") == str(THRESHOLD)
    page.fill("#q", "a beach")
    page.press("#q", "Enter")
    page.wait_for_selector("#results a.card")
    assert page.locator("#duplicates-view").is_hidden() and "view=" not in page.url
    page.go_back()
    page.wait_for_selector("#duplicates-view:not([hidden])")


def test_the_watch_line_names_the_folder_as_text_and_shows_a_new_file(page, watched: dict[str, object]) -> None:
    folder = watched["folder"]
    assert isinstance(folder, Path)
    wait_until_indexed(page, 9)
    line = page.locator("#watch-line")
    line.wait_for(state="visible")
    page.wait_for_function("() => document.querySelector('#watch-line').textContent.includes('last change')")
    assert page.locator("#watch-line code").inner_text() == HOSTILE_FOLDER
    assert page.locator("#watch-line code").get_attribute("title") == os.path.realpath(folder)
    nothing_injected(page)
    draw_photo(77, (320, 240)).save(folder / "new arrival.jpg")
    page.wait_for_function(
        "() => document.querySelector('#watch-line').textContent"
        " .includes('1 added, 0 changed, 0 moved, 0 removed, 0 failed')",
        polling=500,
    )
    assert line.inner_text().startswith("Watching ")
    shoot(page, "web-watch-line.png")


def answering(body: dict[str, object]):  # -> a Playwright route handler
    return lambda route: route.fulfill(json=body)


def test_the_watch_line_says_what_went_wrong_and_is_absent_without_watch(browser, server: LiveServer) -> None:  # noqa: F811
    """The server's answers are replaced here (a folder gone, the watch stopped; no --watch at
    all), to see how the page shows them."""
    broken = {
        "active": True,
        "folders": ["/pics/<b>bold</b>"],
        "phase": "failed",
        "applying": False,
        "pending": 2,
        "last_batch": {"at": 0, "new": 1, "copied": 2, "updated": 3, "moved": 4, "removed": 5, "failed": 6},
        "missing": ["/pics/<b>bold</b>"],
        "error": "cannot watch /pics/<b>bold</b>: No such file or directory",
    }
    for answer, visible in ((broken, True), ({"active": False}, False)):
        context = browser.new_context()
        try:
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.route("**/api/watch", answering(answer))
            page.goto(server.url)
            page.wait_for_function("() => document.querySelector('#info').textContent.includes('indexed')")
            page.wait_for_timeout(500)  # the first /api/watch answer has been handled
            line = page.locator("#watch-line")
            assert line.is_visible() == visible
            if visible:
                text = line.inner_text()
                assert "Stopped watching" in text and "2 changes pending" in text
                assert "3 added, 3 changed, 4 moved, 5 removed, 6 failed" in text  # added: new and copied
                assert "watched folder gone: /pics/<b>bold</b>" in text
                assert page.locator("#watch-line b").count() == 0
                errors = page.locator(".watch-error").all_inner_texts()
                assert any("cannot watch /pics/<b>bold</b>" in e for e in errors), errors
        finally:
            context.close()


def test_progress_and_cancel_while_a_run_goes_on(browser, server: LiveServer) -> None:  # noqa: F811
    """The server's answers are replaced (a run of 5,000 images under way) to see the progress
    the page shows, and that Cancel asks the server to stop it."""
    running = {
        "state": "running",
        "threshold": 0.97,
        "under": None,
        "phase": "comparing",
        "scanned": 1200,
        "total": 5000,
        "groups_found": 7,
        "started_at": 1_700_000_000,
        "finished_at": None,
        "elapsed_s": 12.4,
        "error": None,
        "default_threshold": 0.95,
    }
    sent: list[str] = []

    def duplicates(route) -> None:  # type: ignore[no-untyped-def]
        sent.append(route.request.method)
        answer = running if sent.count("DELETE") == 0 else {**running, "state": "cancelled"}
        route.fulfill(json=answer)

    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server.url)
        wait_until_indexed(page, 9)  # the watch's first run over (it holds the index meanwhile)
        page.route("**/api/duplicates*", duplicates)
        page.goto(server.url + "?view=duplicates")
        page.wait_for_selector("#dupes-progress:not([hidden])")
        text = page.inner_text("#dupes-progress-text")
        assert text == "Compared 1,200 of 5,000 pictures · 7 groups so far · 12 s", text
        assert page.eval_on_selector("#dupes-bar", "bar => [bar.value, bar.max]") == [1200, 5000]
        assert page.input_value("#dupes-threshold") == "0.97"  # the running one's
        assert page.locator("#dupes-start").is_disabled()
        page.click("#dupes-cancel")
        page.wait_for_function("() => document.querySelector('#dupes-summary').textContent.startsWith('Cancelled')")
        assert "DELETE" in sent and "POST" not in sent
        assert page.locator("#dupes-progress").is_hidden() and page.locator("#dupes-cancel").is_hidden()
        assert page.inner_text("#dupes-summary") == "Cancelled after comparing 1,200 of 5,000 pictures."
    finally:
        context.close()
