"""Combined queries: ``sunset + ./beach.jpg - people`` as one vector.

A query is a list of :class:`Term`: a text, an image (a file, or a picture already decoded) or an
indexed file (its stored vector, no decoding). Each term's vector is unit length; the query's is
the sum of the ``+`` terms minus the ``-`` terms, made unit again, so scores stay cosines. The
syntax is rclip's: terms joined by `` + `` and `` - `` with a space on both sides (``spider-man``
and ``a-b`` are one term), and a term that starts with ``/``, ``./``, ``../`` or ``~/`` is the path
of an image. ``combine=False`` (``--no-combine``) takes the whole text as one term, for a text that
contains `` - `` itself.

Kept apart from :mod:`pixfind.search` so that parsing needs neither numpy nor a model: the CLI
checks a query before it opens anything, and the web app refuses path terms before they reach
the index.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import PixfindError
from .limits import MAX_QUERY_CHARS, MAX_QUERY_TERMS, check_query

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from .models.base import Encoder
    from .store import Store

#: `` + `` or `` - ``: an operator needs a space on each side.
_OPERATOR = re.compile(r" ([+-]) ")
#: How a term says it is the path of an image file (rclip's rule, plus ``../`` and ``~/``).
PATH_PREFIXES = ("/", "./", "../", "~/")


@dataclass(frozen=True, eq=False)
class Term:
    """One part of a query; ``sign`` +1 adds it, -1 takes it away. Exactly one of ``text``,
    ``image`` (a file path or a decoded picture) and ``indexed`` (the path of an indexed file,
    searched by its stored vector) is set."""

    text: str | None = None
    image: str | Path | Image.Image | None = None
    indexed: str | None = None
    sign: int = 1

    def __post_init__(self) -> None:
        if sum(part is not None for part in (self.text, self.image, self.indexed)) != 1:
            raise PixfindError("a query term is exactly one of: a text, an image or an indexed file")
        if self.sign not in (1, -1):
            raise PixfindError(f"a query term's sign is +1 or -1, got {self.sign}")

    def describe(self) -> str:
        """The term as the user wrote it (for error lines and the character count)."""
        if self.text is not None:
            return self.text
        if self.indexed is not None:
            return self.indexed
        return os.fspath(self.image) if isinstance(self.image, (str, Path)) else "an uploaded image"


def looks_like_path(text: str) -> bool:
    return text.startswith(PATH_PREFIXES)


def term_of(text: str, sign: int = 1) -> Term:
    """One term as typed: the path of an image when it starts like one, else a text."""
    text = text.strip()
    if looks_like_path(text):
        path = os.path.expanduser(text)
        if not os.path.exists(path):
            raise PixfindError(
                f"query image not found: {text} (a term starting with / ./ ../ or ~/ is an image file; "
                "--no-combine searches for the text as written)"
            )
        return Term(image=path, sign=sign)
    return Term(text=check_query(text), sign=sign)


def parse_query(query: str, combine: bool = True) -> list[Term]:
    """``query`` as its terms; with ``combine=False`` the whole text is one text term."""
    whole = check_query(query)
    if not combine:
        return [Term(text=whole)]
    parts = _OPERATOR.split(whole)
    terms: list[Term] = []
    for index in range(0, len(parts), 2):
        sign = -1 if index and parts[index - 1] == "-" else 1
        if not parts[index].strip():
            raise PixfindError(
                f"empty term in the query {whole!r}: put a text or an image path on each side of + and - "
                "(--no-combine searches for the text as written)"
            )
        terms.append(term_of(parts[index], sign))
    return terms


def subtracted(values: Iterable[str | Term]) -> list[Term]:
    """Terms to take away, given as typed (text or image path) or as terms."""
    out = []
    for value in values:
        if isinstance(value, Term):
            out.append(Term(value.text, value.image, value.indexed, sign=-1))
        else:
            out.append(term_of(value, -1))
    return out


def check_terms(terms: Sequence[Term]) -> list[Term]:
    """The query limits (:mod:`pixfind.limits`) over all the terms together."""
    if not terms:
        raise PixfindError('empty query: describe the picture in words, e.g. "a white dog"')
    if len(terms) > MAX_QUERY_TERMS:
        raise PixfindError(f"too many terms in the query ({len(terms)}, limit {MAX_QUERY_TERMS})")
    characters = sum(len(term.describe()) for term in terms)
    if characters > MAX_QUERY_CHARS:
        raise PixfindError(f"query too long ({characters:,} characters in its terms, limit {MAX_QUERY_CHARS:,})")
    return list(terms)


def query_vector(terms: Sequence[Term], encoder: Callable[[], Encoder], store: Store) -> np.ndarray:
    """The unit vector of the sum of the terms' unit vectors, each with its sign. The model is
    asked for only when a term needs it (an indexed file's vector is read from the index)."""
    import numpy as np

    from .search import image_vector, stored_vector
    from .vectors import unit_rows

    check_terms(terms)
    texts = [term.text for term in terms if term.text is not None]
    text_rows = iter(encoder().encode_texts(texts)) if texts else iter(())
    rows = []
    for term in terms:
        if term.text is not None:
            row = next(text_rows)
        elif term.indexed is not None:
            row = stored_vector(store, term.indexed)
        else:
            row = image_vector(encoder(), term.image)  # type: ignore[arg-type]
        rows.append(unit_rows(row)[0])
    if len(terms) == 1 and terms[0].sign == 1:
        return rows[0]  # one term: its own vector, bit for bit
    total = np.zeros(rows[0].shape, dtype=np.float64)
    for term, row in zip(terms, rows, strict=True):
        total += term.sign * row.astype(np.float64)
    length = float(np.linalg.norm(total))
    if length < 1e-6:
        raise PixfindError("the query's terms cancel each other out: change or remove a term")
    return (total / length).astype(np.float32)


def indexed_paths(terms: Sequence[Term]) -> list[str]:
    """The indexed files a query is made of: a "more like this" never answers with them."""
    return [term.indexed for term in terms if term.indexed is not None]
