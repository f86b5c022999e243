"""The Python API: one object that indexes folders and answers queries.

    from pixfind import ImageIndex
    with ImageIndex(uri="milvus.db") as idx:
        idx.add("./photos")
        for hit in idx.search("a white dog", limit=10):
            print(hit.score, hit.path)

The model is loaded on first use and kept; the collection records which model built it, and a
later ImageIndex uses that one unless told otherwise (another model is an error, never a mix).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ModelSpec, Settings, precision_from
from .errors import PixfindError
from .pathkeys import key_of
from .store import Store, check_same_model

# The indexer and the query side (numpy, Pillow: ~60 ms) are imported where they are used, so a
# cold search starts its Milvus Lite engine before paying for them (see Store).
if TYPE_CHECKING:
    from PIL import Image

    from .duplicates import DuplicateGroup
    from .filters import Filters
    from .ingest.ray_runner import RayOptions
    from .ingest.report import IndexReport, Progress
    from .models.base import Encoder
    from .parquet import ExportReport
    from .query import Term
    from .search import Hit


class ImageIndex:
    def __init__(
        self,
        uri: str | None = None,
        token: str | None = None,
        collection: str | None = None,
        model: str | ModelSpec | None = None,
        pretrained: str | None = None,
        checkpoint: str | None = None,
        device: str | None = None,
        wait: bool = False,
        settings: Settings | None = None,
        create: bool = True,
        encoder: Encoder | None = None,
        precision: str | None = None,
    ) -> None:
        """``precision``: what the CPU image model computes in, auto, f32 or bf16 (default
        ``$PIXFIND_PRECISION`` or auto: bf16 where the CPU has bf16 arithmetic)."""
        base = settings or Settings.from_env()
        spec = _spec_from_args(model, pretrained, checkpoint, base.model)
        self.settings = replace(
            base,
            uri=uri or base.uri,
            token=token if token is not None else base.token,
            collection=collection or base.collection,
            model=spec,
            device=device or base.device,
            precision=precision_from(precision, "precision") if precision else base.precision,
        )
        self.store = Store(
            self.settings.uri,
            self.settings.token,
            self.settings.collection,
            wait=wait,
            create=create,
            search_ef=self.settings.search_ef,
            defer=create,  # a new Lite file is made only when there is something to store
        )
        self._encoder: Encoder | None = encoder  # a loaded model may be shared between indexes
        self._query_encoder: Encoder | None = None
        self._encoder_lock = threading.Lock()
        self._has_rows = False
        self._optimized = False  # Lite searched through IVF, see optimize_for_queries()

    # -- model ------------------------------------------------------------------------------

    def model_spec(self) -> ModelSpec:
        """The model of the collection if it exists (checked against any requested), else the
        requested one, else the default ViT-B-32 / openai."""
        info = self.store.info()
        if info is not None:
            if self.settings.model is not None:
                check_same_model(info, self.settings.model, None, self.settings.collection)
            return info.model
        return self.settings.model or ModelSpec()

    @property
    def encoder(self) -> Encoder:
        """The full model for indexing: the exported ONNX towers on CPU (checked against torch;
        images on OpenVINO, see :mod:`pixfind.models.openvino_runtime`), torch on CUDA or when the export
        is not possible (``PIXFIND_BACKEND`` overrides)."""
        return self.load_encoder()

    def load_encoder(self, status: Callable[[str], None] | None = None) -> Encoder:
        """:attr:`encoder`, telling ``status`` what takes the time meanwhile (loading the model,
        downloading its weights, exporting it for the CPU on a first run)."""
        with self._encoder_lock:
            if self._encoder is None:
                from .models.load import load_encoder

                self._encoder = load_encoder(self.model_spec(), self.settings, status=status)
            info = self.store.info()
            if info is not None:
                check_same_model(info, self._encoder.spec, self._encoder.dim, self.settings.collection)
            return self._encoder

    def query_encoder(self) -> Encoder:
        """What embeds queries: the loaded model if there is one, else the torch-free ONNX
        export of the collection's model when it exists (no torch import: a cold search is
        fast), else the full model."""
        if self._encoder is not None:
            return self._encoder
        if self._query_encoder is None:
            from .models.load import load_query_encoder
            from .models.torch_clip import check_device

            check_device(self.settings.device)  # the ONNX text tower runs on the CPU: refuse as indexing does
            self._query_encoder = load_query_encoder(self.model_spec(), self.settings)
        return self._query_encoder if self._query_encoder is not None else self.encoder

    def _query_encoder_soon(self) -> Callable[[], Encoder]:
        """:meth:`query_encoder`, with the torch-free ONNX export loading in a thread while the
        caller's first Milvus call waits for the collection to load: a cold search then pays
        for the slower of the two, not both. (Only that load: building a torch model seeds
        torch's global random generator, which must not happen behind the caller's back.)"""
        if self._encoder is not None or self._query_encoder is not None:
            return self.query_encoder
        from .models.load import load_query_encoder
        from .models.torch_clip import check_device

        spec = self.model_spec()  # a model mismatch fails here, in the caller's thread
        check_device(self.settings.device)  # and a device this machine lacks
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pixfind-query-encoder")
        loading = pool.submit(load_query_encoder, spec, self.settings)
        pool.shutdown(wait=False)

        def ready() -> Encoder:
            loaded = loading.result()
            if loaded is not None and self._query_encoder is None and self._encoder is None:
                self._query_encoder = loaded
            return self.query_encoder()

        return ready

    # -- indexing ---------------------------------------------------------------------------

    def add(
        self,
        *folders: str | Path,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
        batch_size: int | None = None,
        workers: int | None = None,
        ray: bool | str | RayOptions = False,
    ) -> IndexReport:
        """Index (or re-index, incrementally) image files under ``folders``. ``ray``: embed on a
        Ray cluster (True: ``$RAY_ADDRESS`` or this machine's; its address; or
        :class:`~pixfind.ingest.ray_runner.RayOptions`), see
        :mod:`pixfind.ingest.ray_runner`; the scan, plan and prune stay here."""
        from .ingest.runner import Indexer

        if not folders:
            raise PixfindError("no folder given: pixfind index FOLDER [FOLDER ...]")
        spec = self.model_spec()  # fail early on a model mismatch, before scanning
        if self._encoder is None:
            from .ingest.gpu_decode import check_decode_request
            from .models.torch_clip import check_device
            from .models.weights import check_model_name

            check_device(self.settings.device)  # as a search would, even when no image is new
            check_decode_request(self.settings.decode, self.settings.device)
            if self.store.info() is None:
                check_model_name(spec)  # a typo must not pass silently because no image was new
        if ray:
            return self._add_on_ray(folders, spec, ray, progress, stop, batch_size, workers)
        indexer = Indexer(
            self.store,
            lambda: self.load_encoder(getattr(progress, "status", None)),  # a caller's Progress may predate it
            batch_size=batch_size or self.settings.batch_size,  # None: per the loaded model's device
            workers=workers or self.settings.workers,
            draft=self.settings.draft,
            progress=progress,
            stop=stop,
            decode=self.settings.decode,
        )
        report = indexer.run([str(f) for f in folders])
        if report.embedded and self._encoder is not None:
            report.precision, report.precision_reason = _precision_of(self._encoder)
        if not self._optimized:
            self.store.restore_index()  # an IVF index left by a killed `pixfind serve`
        return report

    def _add_on_ray(
        self,
        folders: tuple[str | Path, ...],
        spec: ModelSpec,
        ray: bool | str | RayOptions,
        progress: Progress | None,
        stop: threading.Event | None,
        batch_size: int | None,
        workers: int | None,
    ) -> IndexReport:
        from .ingest.ray_runner import RayIndexer, ray_options

        if self.settings.decode == "gpu":
            raise PixfindError("--decode gpu works with the local runner only, not --ray; use --decode auto or cpu")
        options = ray_options(ray)
        if batch_size or self.settings.batch_size:
            options = replace(options, embed_batch=batch_size or self.settings.batch_size)
        indexer = RayIndexer(self.store, spec, self.settings, options, progress=progress, stop=stop, workers=workers)
        return indexer.run([str(f) for f in folders])

    def remove(self, *paths: str | Path) -> int:
        """Drop the entries of these files, and of every file under these folders, whether they
        still exist or not; returns how many entries went.

        A path may be relative, absolute, or lead through symbolic links: the entries stored
        under its absolute form and under its form with links resolved both go."""
        if not paths:
            raise PixfindError("no path given: pixfind remove PATH [PATH ...]")
        forms: list[str] = []
        for path in paths:
            expanded = os.path.expanduser(os.fspath(path))
            forms += [os.path.abspath(expanded), os.path.realpath(expanded)]
        return self.store.delete_paths(forms)

    # -- queries ----------------------------------------------------------------------------

    def search(
        self,
        text: str,
        limit: int = 10,
        under: str | None = None,
        *,
        min_score: float | None = None,
        all_copies: bool = False,
        filters: Filters | None = None,
        combine: bool = True,
        subtract: Sequence[str | Term] = (),
    ) -> list[Hit]:
        """Images that match a description, best first.

        ``text`` may combine terms: ``"sunset + ./beach.jpg - people"`` (`` + `` and `` - `` with
        spaces around; a term starting with ``/ ./ ../ ~/`` is an image file); ``combine=False``
        takes it as written. ``subtract``: more terms to take away. ``min_score``: only hits at or
        above this cosine. Exact copies of a file are one hit (``copies`` says how many) unless
        ``all_copies``. ``filters``: only photos taken in a date range, by a camera, of a type or
        shape (:class:`~pixfind.filters.Filters`, e.g. ``Filters.of(after="2024-05-01",
        camera="pixel")``), applied by Milvus inside the search."""
        from .query import parse_query, subtracted

        terms = parse_query(text, combine) + subtracted(subtract)
        return self.search_terms(terms, limit, under, min_score=min_score, all_copies=all_copies, filters=filters)

    def search_image(
        self,
        image: str | Path | Image.Image,
        limit: int = 10,
        under: str | None = None,
        *,
        min_score: float | None = None,
        all_copies: bool = False,
        filters: Filters | None = None,
        subtract: Sequence[str | Term] = (),
    ) -> list[Hit]:
        """Images that look like ``image`` (a file or a PIL image), best first; options as :meth:`search`."""
        from .query import Term, subtracted

        terms = [Term(image=image), *subtracted(subtract)]
        return self.search_terms(terms, limit, under, min_score=min_score, all_copies=all_copies, filters=filters)

    def similar(
        self,
        path: str,
        limit: int = 10,
        under: str | None = None,
        *,
        min_score: float | None = None,
        all_copies: bool = False,
        filters: Filters | None = None,
        subtract: Sequence[str | Term] = (),
    ) -> list[Hit]:
        """Images that look like an indexed file, using its stored vector; the file itself is
        never among them (its exact copies elsewhere are, first). Options as :meth:`search`."""
        from .query import Term, subtracted

        terms = [Term(indexed=path), *subtracted(subtract)]
        return self.search_terms(terms, limit, under, min_score=min_score, all_copies=all_copies, filters=filters)

    def search_terms(
        self,
        terms: Sequence[Term],
        limit: int = 10,
        under: str | None = None,
        *,
        min_score: float | None = None,
        all_copies: bool = False,
        filters: Filters | None = None,
    ) -> list[Hit]:
        """Images that match a combination of :class:`~pixfind.query.Term` (texts, images,
        indexed files, each added or taken away), best first; options as :meth:`search`."""
        from .limits import check_limit, check_min_score
        from .query import check_terms, indexed_paths, query_vector
        from .results import find

        check_terms(terms)
        check_limit(limit)
        check_min_score(min_score)
        needs_model = any(term.indexed is None for term in terms)
        encoder = self._query_encoder_soon() if needs_model else self.query_encoder
        self._require_rows()
        vector = query_vector(terms, encoder, self.store)
        return find(
            self.store,
            vector,
            limit,
            under,
            min_score=min_score,
            all_copies=all_copies,
            exclude=indexed_paths(terms),
            filters=filters,
        )

    def duplicates(
        self,
        threshold: float | None = None,
        under: str | None = None,
        progress: Callable[[int, int], None] | None = None,
        status: Callable[[str], None] | None = None,
        found: Callable[[int], None] | None = None,
        batch: int | None = None,
    ) -> list[DuplicateGroup]:
        """Groups of near-identical indexed images (copies, resized, re-encoded, lightly
        cropped), from the stored vectors (no model is loaded); ``threshold``: the cosine at or
        above which two images are duplicates (default :data:`pixfind.duplicates.DEFAULT_THRESHOLD`).

        Every stored vector is searched once, so a Milvus Lite file of 50,000+ images is first
        switched to its IVF index as :meth:`optimize_for_queries` does (Lite's exact search
        takes ~50 ms a vector at 100k; :meth:`close` puts the exact index back); ``status`` is
        told while that takes its seconds, ``progress(done, total)`` after each batch, ``found``
        the number of groups so far; ``batch``: stored vectors per search (default 500)."""
        from .duplicates import DEFAULT_THRESHOLD, check_threshold, find_duplicates
        from .search import resolve_under

        limit = check_threshold(DEFAULT_THRESHOLD if threshold is None else threshold)
        self._require_rows()
        if status is not None and not self._optimized and not self.store.is_server:
            status("preparing the index for a search of every image")
        self.optimize_for_queries()
        return find_duplicates(self.store, limit, resolve_under(under), progress, found, batch)

    def export(
        self,
        path: str | Path,
        under: str | None = None,
        force: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> ExportReport:
        """Write every stored vector and record (under ``under``) to a Parquet file, streamed in
        batches; an existing ``path`` is refused unless ``force`` (needs pyarrow: ``pixfind[export]``)."""
        from .parquet import export_parquet
        from .search import resolve_under

        return export_parquet(self.store, path, resolve_under(under), force, progress)

    def contains(self, path: str) -> bool:
        from .search import candidate_paths

        keys = [key_of(p) for p in candidate_paths(path)]
        return self.store.exists() and bool(self.store.lookup(keys))

    def info(self) -> dict[str, Any]:
        """Where the index is and what it holds; loads no model."""
        info = self.store.info()
        data: dict[str, Any] = {
            "uri": self.store.uri,
            "collection": self.settings.collection,
            "backend": "milvus-server" if self.store.is_server else "milvus-lite",
            "exists": info is not None,
            "images": self.store.count() if info is not None else 0,
        }
        if info is not None:
            data.update(model=info.model.name, weights=info.model.weights, dim=info.dim, schema=info.schema)
            data["images_with_facts"] = self.rows_with_facts() if data["images"] else 0
        if not self.store.is_server:
            data["size_bytes"] = _disk_size(self.store.uri)
        data["cpu_precision"] = self._cpu_precision(info.model if info is not None else None)
        return data

    def _cpu_precision(self, spec: ModelSpec | None) -> dict[str, str]:
        """What an index run on this machine's CPU would embed images in, and why (no model loaded)."""
        from .models.load import planned_image_precision

        precision, reason = planned_image_precision(spec or self.settings.model or ModelSpec(), self.settings)
        return {"precision": precision, "reason": reason}

    def rows_with_facts(self) -> int:
        """How many rows carry the date, camera and type the filters use (rows indexed before
        pixfind recorded them get them on the next ``pixfind index``); 0 in a schema-1 collection."""
        from .filters import LOWEST

        info = self.store.info()
        if info is None or info.schema < 2:
            return 0
        return self.store.count(f'meta["taken"] >= {LOWEST}')

    def drop(self) -> None:
        self.store.drop()
        self._has_rows = False

    def _require_rows(self) -> None:
        """Refuse to search an empty index; counted until rows are seen (a count costs a query)."""
        if self._has_rows:
            return
        if self.store.info() is None or self.store.count() == 0:
            raise PixfindError(f"the index at {self.store.uri} is empty: run `pixfind index FOLDER` first")
        self._has_rows = True

    def optimize_for_queries(self) -> bool:
        """For a long-lived process that answers many queries from a Milvus Lite file of 50,000+
        images: search an approximate IVF index until :meth:`close`, which puts the exact index
        back on file. At 100k images a Milvus search then takes ~2.4 ms instead of ~28 ms, at
        recall@10 0.97 against exact search (``benchmarks/search_latency.py``, clustered vectors;
        Milvus Lite ignores ``nprobe``, so this cannot be tuned); switching takes ~5 s each way. Returns
        True when switched; False (exact search kept) on a Milvus server, which has its own ANN
        index, for a smaller collection, or when the switch fails."""
        if not self._optimized:
            try:
                self._optimized = self.store.index_for_serving()
            except PixfindError:
                with contextlib.suppress(PixfindError):
                    self.store.restore_index()
        return self._optimized

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        if self._optimized:
            self._optimized = False
            with contextlib.suppress(PixfindError):
                self.store.restore_index()
        self.store.close()

    def __enter__(self) -> ImageIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _spec_from_args(
    model: str | ModelSpec | None, pretrained: str | None, checkpoint: str | None, env: ModelSpec | None
) -> ModelSpec | None:
    if isinstance(model, ModelSpec):
        return model
    if model is None and pretrained is None and checkpoint is None:
        return env
    from .config import DEFAULT_MODEL, DEFAULT_PRETRAINED, normalise_pretrained

    base = env or ModelSpec()
    name = model or base.name or DEFAULT_MODEL
    if checkpoint:
        return ModelSpec(name=name, pretrained=None, checkpoint=str(Path(checkpoint).expanduser().resolve()))
    tag = (
        normalise_pretrained(pretrained)
        if pretrained is not None
        else (base.pretrained if env is not None else DEFAULT_PRETRAINED)
    )
    return ModelSpec(name=name, pretrained=tag)


def _precision_of(encoder: Encoder) -> tuple[str | None, str]:
    """What ``encoder``'s image model computed in, and why, with the runtime named."""
    reason = encoder.precision_reason
    runtime = {"openvino": "OpenVINO", "onnxruntime": "ONNX Runtime"}.get(encoder.image_runtime or "")
    return encoder.image_precision, f"{runtime}; {reason}" if runtime and reason else runtime or reason


def _disk_size(uri: str) -> int:
    total = 0
    for candidate in (uri, uri + ".lock"):
        with contextlib.suppress(OSError):
            total += os.path.getsize(candidate)
    return total
