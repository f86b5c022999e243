"""The one vector contract: every vector pixfind stores or queries with is a float32 row of length 1.

Unit length makes the inner product of two vectors their cosine, which is the metric the store
searches with. Encoders return their rows through :func:`unit_rows`; the store passes every row
through it again on the way in, so a vector from elsewhere (the Python API) is normalised too,
while one an encoder already normalised is stored exactly as it was computed.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

#: A row whose length is within this of 1 is already unit: float32 rounding of a normalised
#: 512-d row stays below 1e-6, so such rows pass unchanged, bit for bit.
UNIT_TOLERANCE = 1e-6


def unit_rows(vectors: ArrayLike) -> np.ndarray:
    """``vectors`` (one row, or N rows) as float32 rows of length 1, shape (N, dim).

    Rows already of unit length pass unchanged; an all-zero row stays zero (it has no direction).
    """
    rows = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    norms = np.linalg.norm(rows.astype(np.float64), axis=1, keepdims=True)
    rescale = (np.abs(norms - 1.0) > UNIT_TOLERANCE) & (norms > 0)
    return (rows / np.where(rescale, norms, 1.0)).astype(np.float32)
