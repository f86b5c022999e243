"""The limits every way of asking pixfind shares: command line, Python API, web API and page.

Defined once, here, and stated in the README's "Limits" table (the tests read it from there), so
that a query that works in one place works in all: ``pixfind search`` hands its queries to a
running ``pixfind serve`` and must not meet other limits there. Imports nothing heavy, so the
command line can check its options without loading numpy or Pillow.
"""

from __future__ import annotations

from .errors import PixfindError

#: Longest query text, in characters. CLIP reads at most 77 tokens; this only bounds the work
#: (and what a request may carry).
MAX_QUERY_CHARS = 1000
#: Most results one query returns (``-k``, ``limit=``, the API's ``k``).
MAX_RESULTS = 1000
DEFAULT_RESULTS = 10

#: Most terms in one combined query (``sunset + ./beach.jpg - people``), text and image terms
#: together: each image term is a decode and a model call.
MAX_QUERY_TERMS = 8

#: Largest image file ``pixfind serve`` accepts for search by image (the multipart framing around
#: it is allowed for separately).
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
#: Most pixels of an uploaded image, read from its header before anything is decoded: a query
#: needs 224 px, and decoding costs memory in proportion (up to ~16 bytes a pixel for WebP).
MAX_UPLOAD_PIXELS = 12_000_000
#: JPEGs are decoded at 1/2 to 1/8 scale by the codec itself, so larger ones cost little (a
#: progressive one still holds ~3 bytes a pixel of coefficients while decoding).
MAX_UPLOAD_JPEG_PIXELS = 50_000_000
#: Shorter side a query image is decoded to (server uploads, and what ``pixfind search --image``
#: sends to a running server): twice CLIP's 224 px input keeps the embedding within cosine 0.995.
QUERY_IMAGE_SIDE = 448


def check_query(text: str) -> str:
    """The query text, stripped; one clear error when it is empty or too long."""
    text = text.strip()
    if not text:
        raise PixfindError('empty query: describe the picture in words, e.g. "a white dog"')
    if len(text) > MAX_QUERY_CHARS:
        raise PixfindError(f"query too long ({len(text):,} characters, limit {MAX_QUERY_CHARS:,})")
    return text


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_RESULTS:
        raise PixfindError(f"result count must be between 1 and {MAX_RESULTS:,}, got {limit}")
    return limit


def check_min_score(min_score: float | None) -> float | None:
    """A score cut-off is a cosine: between -1 and 1 (None: no cut-off)."""
    if min_score is None:
        return None
    if not -1.0 <= min_score <= 1.0:  # NaN fails this too
        raise PixfindError(f"minimum score must be a cosine between -1 and 1, got {min_score}")
    return float(min_score)
