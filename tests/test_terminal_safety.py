"""File names are untrusted: whatever a name holds, nothing pixfind prints to a terminal can move
the cursor, clear the screen, hide text, write the clipboard or reorder what is shown.

Control characters (C0, DEL, C1), undecodable bytes, line separators and the Unicode
bidirectional controls ("Trojan Source") are shown as visible escapes, as ``ls`` and git do. The
tests name files the way an attacker would and read the output of the real command, on a
pseudo-terminal where it matters (rich styles its output there) and through pipes.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
import unicodedata
from pathlib import Path

import pytest
from conftest import draw_photo

from pixfind.cli import main
from pixfind.render import json_text, printable

#: Names a hostile local user could give files, with what each one would do if printed raw.
HOSTILE = {
    "clear\x1b[2J\x1b[H.jpg": "clears the screen",
    "hide\x1b[8mSECRET.jpg": "conceals the rest of the line",
    "clip\x1b]52;c;cm0gLXJmIH4K\x07.jpg": "writes the clipboard (OSC 52)",
    "c1\x9b2J.jpg": "C1 CSI: clears the screen on terminals that take UTF-8 C1 controls",
    "del\x7fete.jpg": "DEL",
    "back\x08\x08\x08.jpg": "backspaces over the name",
    "cr\rfake.jpg": "carriage return: overwrites the start of the line",
    "photo\u202egnp.jpg": "RLO: a JPEG that shows as photogpj.png",
    "iso\u2066late\u2069.jpg": "bidi isolate",
    "mark\u200fed.jpg": "RLM",
    "line\u2028sep.jpg": "line separator",
    os.fsdecode(b"raw\x9b2J.jpg"): "a raw C1 byte, not UTF-8",
}
#: Sequences that must never reach a terminal from a name (rich's own styling uses none of them).
#: (A carriage return cannot be told apart here: rich's progress display uses it.)
PAYLOADS = ["\x1b[2J", "\x1b[H", "\x1b[8m", "\x1b]52", "\x1b]0;", "\x9b", "\x7f", "\x08", "\x07"]

BIDI_CONTROLS = {"LRE", "RLE", "PDF", "LRO", "RLO", "LRI", "RLI", "FSI", "PDI"}


def unsafe_characters(text: str, allowed: str = "\n") -> list[str]:
    """Characters that change what a terminal shows instead of being shown, by Unicode's own
    tables: controls (Cc), surrogates (undecodable bytes), line and paragraph separators, the
    bidirectional embeddings, overrides and isolates, and the implicit directional marks."""
    found = []
    for char in text:
        if char in allowed:
            continue
        category = unicodedata.category(char)
        if (
            category in ("Cc", "Cs", "Zl", "Zp")
            or unicodedata.bidirectional(char) in BIDI_CONTROLS
            or unicodedata.name(char, "").endswith(("-TO-RIGHT MARK", "-TO-LEFT MARK", "LETTER MARK"))
        ):
            found.append(char)
    return found


def test_printable_escapes_every_control_and_nothing_else() -> None:
    everything = [chr(c) for c in range(0x3000)] + ["\udc9b", "\udcff", "\ud800"]
    unsafe = [c for c in everything if unsafe_characters(c, allowed="")]
    assert len(unsafe) >= 32 + 1 + 32 + 9 + 2  # C0, DEL, C1, the bidi controls, separators
    for char in everything:
        shown = printable(char)
        if char in unsafe:  # shown as a visible ASCII escape
            assert shown.startswith("\\") and len(shown) > 1 and shown.isascii() and shown.isprintable(), ascii(char)
        else:
            assert shown == char, ascii(char)
    assert printable("emoji 🐶 café 日本語 ☃ a\\b.jpg") == "emoji 🐶 café 日本語 ☃ a\\b.jpg"
    assert printable(os.fsdecode(b"caf\xe9.jpg")) == "caf\\xe9.jpg"  # the undecodable byte itself
    assert printable("a\nb\tc\x1b[2J\u202e") == "a\\nb\\tc\\x1b[2J\\u202e"
    for name in HOSTILE:
        assert unsafe_characters(printable(name), allowed="") == []


def test_summary_lines_are_safe_to_print() -> None:
    """The index run's summary, for API users printing it themselves (the CLI escapes again)."""
    from pixfind.ingest.report import IndexReport
    from pixfind.render import summary_lines

    report = IndexReport(failed=[(f"/p/{name}", f"cannot open {name!s}") for name in HOSTILE])
    lines = summary_lines(report)
    assert len(lines) == 1 + len(HOSTILE)
    assert all(unsafe_characters(line, allowed="") == [] for line in lines)


def _library(root: Path) -> tuple[Path, list[Path]]:
    """A folder whose own name sets the window title, holding photos under the hostile names and
    one broken file (skipped, so its name is printed in the summary)."""
    folder = root / "lib\x1b]0;pwned\x07"
    folder.mkdir(parents=True)
    paths = []
    for seed, name in enumerate(HOSTILE):
        path = folder / name
        draw_photo(seed, (64, 48)).save(path, "JPEG")
        paths.append(path)
    (folder / "broken\x1b[2J\u202e.jpg").write_bytes(b"not an image at all")
    return folder, paths


def _in_terminal(args: list[str], env: dict[str, str], timeout: float = 300) -> str:
    """Run ``pixfind ARGS`` on a pseudo-terminal 400 columns wide; returns everything it showed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 400, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "pixfind", *args], stdin=slave, stdout=slave, stderr=slave, env=env
    )
    os.close(slave)
    shown = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the command ended and closed the terminal
                    break
                if not chunk:
                    break
                shown += chunk
            elif process.poll() is not None:
                break
        assert process.wait(timeout=max(1.0, deadline - time.monotonic())) == 0, shown.decode(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
        os.close(master)
    return shown.decode("utf-8")


def test_hostile_names_on_a_real_terminal(tmp_path: Path) -> None:
    folder, _ = _library(tmp_path)
    env = {**os.environ, "PIXFIND_URI": str(tmp_path / "t.db"), "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    indexed = _in_terminal(["index", str(folder)], env)
    assert "skipped" in indexed and "broken\\x1b[2J\\u202e.jpg" in indexed
    assert f"{len(HOSTILE)} new" in indexed

    grid = tmp_path / "grid\x1b[2J.png"
    found = _in_terminal(["search", "anything", "-k", "50", "--grid", str(grid)], env)
    assert grid.stat().st_size > 0
    assert "wrote " in found and "grid\\x1b[2J.png" in found
    rows = [line for line in found.splitlines() if "lib\\x1b]0;pwned\\x07" in line]
    assert len(rows) == len(HOSTILE)  # a row per hit, each on one line
    assert any("photo\\u202egnp.jpg" in row for row in rows)
    assert any("raw\\x9b2J.jpg" in row for row in rows)
    assert any("cr\\rfake.jpg" in row for row in rows)
    assert "\x1b[1m" in found or "\x1b[2m" in found  # it was styled: rich saw a terminal
    for said in (indexed, found):
        for payload in PAYLOADS:
            assert payload not in said.replace("\r\n", "\n"), payload
        # rich's own escapes are CSI sequences (ESC "["): strip them, then nothing may remain
        plain = _strip_csi(said.replace("\r\n", "\n"))
        assert unsafe_characters(plain, allowed="\n\r") == []


def _strip_csi(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def test_error_lines_show_hostile_paths_visibly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = str(tmp_path / "e.db")
    folder, _ = _library(tmp_path)
    assert main(["index", str(folder / "clear\x1b[2J\x1b[H.jpg"), "--uri", uri]) == 0
    capsys.readouterr()
    attempts = [
        (["index", str(tmp_path / "gone\x1b[2J\u202e"), "--uri", uri], "folder not found"),
        (["search", "--similar", str(tmp_path / "not\x1b]52;c;eA==\x07.jpg"), "--uri", uri], "not in the index"),
        (["search", "--image", str(tmp_path / "q\x1b[8m.jpg"), "--uri", uri], "not found"),
        (["search", "--image", str(folder / "broken\x1b[2J\u202e.jpg"), "--uri", uri], "cannot read query image"),
        (["search", "dog", "--uri", uri, "--grid", str(tmp_path / "no\x1b[2J" / "g.txt")], "cannot write grid"),
    ]
    for args, expected in attempts:
        code = main(args)
        out, err = capsys.readouterr()
        assert code != 0 and expected in err, (args, err)
        assert err.count("\n") == 1, err  # one line, whatever the name holds
        assert unsafe_characters(out + err) == [], err
        assert "\\x1b" in err or "\\u202e" in err, err


def test_json_stays_exact_and_inert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = str(tmp_path / "j.db")
    folder, paths = _library(tmp_path)
    assert main(["index", str(folder), "--uri", uri, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["search", "anything", "--json", "-k", "50", "--uri", uri]) == 0
    out, _ = capsys.readouterr()
    assert unsafe_characters(out) == []  # json escapes them all: \u001b, \u009b, \u202e ...
    assert sorted(hit["path"] for hit in json.loads(out)) == sorted(str(p) for p in paths)
    data = {"path": "".join(chr(c) for c in range(0x3000)) + "\udc9b"}
    assert json.loads(json_text(data)) == data and unsafe_characters(json_text(data)) == []
