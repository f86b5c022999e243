"""Exception text cut to what fits in pixfind's one-line errors (imports nothing)."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type's name when it has none), shortened."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


def first_sentence(exc: BaseException, limit: int = 200) -> str:
    """The first sentence of an exception's first line, whole: torch's messages run for
    paragraphs, and a line cut at a fixed width can end mid-word."""
    line = first_line(exc, limit=10_000)
    end = line.find(". ")
    sentence = line[: end + 1] if end > 0 else line
    if len(sentence) > limit:
        sentence = sentence[:limit].rsplit(" ", 1)[0] + " ..."
    return sentence


def failure_text(exc: BaseException) -> str:
    """``Type: first line of the message`` (the type alone when the message is empty or blank)."""
    name, line = type(exc).__name__, first_line(exc, 300)
    return name if line == name else f"{name}: {line}"
