"""CLIP's byte-level BPE tokenizer without torch.

A line-for-line port of ``open_clip.tokenizer.SimpleTokenizer`` (``clean='lower'``, no reduction,
no extra special tokens: the tokenizer of every OpenAI-style CLIP model) that returns numpy arrays.
``open_clip.tokenizer`` imports torch (seconds, cold); this module imports only ``regex``, and
``ftfy`` only for text that is not plain printable ASCII (``ftfy.fix_text`` leaves such text
unchanged, so its import is skipped for ordinary queries). Equality of the ids with open_clip's is
checked at export time and in the tests. :func:`trim_padding` is the one padding trim of both
runtimes (torch queries and the exported text tower).
"""

from __future__ import annotations

import gzip
import html
import re as _re
from functools import lru_cache
from itertools import pairwise
from pathlib import Path

import numpy as np

#: Printable ASCII without "&" (HTML entities): ``ftfy.fix_text`` returns such text unchanged.
_PLAIN = _re.compile(r"[ -%'-~]*")


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _fix_text(text: str) -> str:
    if _PLAIN.fullmatch(text):
        return text
    import ftfy

    return ftfy.fix_text(text)


def clean_lower(text: str) -> str:
    """open_clip's ``_clean_lower``: ftfy, HTML unescape twice, collapse whitespace, lower case."""
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


class ClipTokenizer:
    """Callable like open_clip's tokenizer: ``tokenizer(texts) -> int64 array (N, context_length)``."""

    def __init__(self, bpe_path: str | Path, context_length: int = 77) -> None:
        """``bpe_path``: open_clip's ``bpe_simple_vocab_16e6.txt.gz``, or the same text unpacked
        (the export cache keeps it unpacked: reading it is much faster than gunzip)."""
        import regex

        # merges are "first second" lines; ranks stay keyed by that string (no tuples: faster to
        # load, which is most of a cold query's tokenizer cost)
        path = Path(bpe_path)
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        merges = raw.decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
        byte_chars = list(bytes_to_unicode().values())
        vocab = byte_chars + [v + "</w>" for v in byte_chars]
        vocab += [m.replace(" ", "") for m in merges]
        special = ["<start_of_text>", "<end_of_text>"]
        vocab += special
        self.byte_encoder = bytes_to_unicode()
        self.encoder = dict(zip(vocab, range(len(vocab)), strict=True))
        self.bpe_ranks = dict(zip(merges, range(len(merges)), strict=True))
        self.cache = {t: t for t in special}
        self.pat = regex.compile(
            "|".join(special) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self.sot_token_id = self.encoder["<start_of_text>"]
        self.eot_token_id = self.encoder["<end_of_text>"]
        self.vocab_size = len(self.encoder)
        self.context_length = context_length

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = (*tuple(token[:-1]), token[-1] + "</w>")
        pairs = _pairs(word)
        if not pairs:
            return token + "</w>"
        ranks = self.bpe_ranks
        while True:
            bigram = min(pairs, key=lambda pair: ranks.get(pair, _NEVER))
            if bigram not in ranks:
                break
            first, second = bigram.split(" ")
            new_word: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = _pairs(word)
        joined = " ".join(word)
        self.cache[token] = joined
        return joined

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for token in self.pat.findall(clean_lower(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(token).split(" "))
        return ids

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        result = np.zeros((len(texts), length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = self.eot_token_id
            result[row, : len(ids)] = ids
        return result


_NEVER = float("inf")


def _pairs(word: tuple[str, ...]) -> set[str]:
    return {f"{a} {b}" for a, b in pairwise(word)}


def trim_padding(tokens: np.ndarray) -> np.ndarray:
    """Drop trailing columns that are padding (id 0) in every row. CLIP's text tower pools at the
    end-of-text token under a causal mask, so that padding cannot change the vector (for towers
    that take any length: :func:`pixfind.models.torch_clip.trimmed_text_tower`)."""
    used = np.flatnonzero((tokens != 0).any(axis=0))
    if len(used) == 0:
        return tokens
    return tokens[:, : int(used[-1]) + 1]
