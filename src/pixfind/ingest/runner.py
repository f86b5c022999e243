"""The local index run: the plan, then the pipeline's stages on a thread pool, then the prune.

* *plan* (:mod:`.plan`): scanned files are looked up in chunks; each chunk's reused vectors
  (moved and copied files) are written before the next chunk is planned;
* *embed* (:mod:`.pipeline`): new and changed files are decoded by a small thread pool running
  ahead of the model (a bounded queue of futures, so memory stays flat), embedded in batches and
  upserted every :data:`WRITE_EVERY` rows;
* *prune*: rows under the indexed folders whose files are known to be gone are deleted last.

A stop request (Ctrl-C) finishes the batch in hand, writes it and returns a report marked
``interrupted``; the next run picks up where this one stopped.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from ..config import cpu_cores
from ..models.base import Encoder
from ..store import Row, Store
from .backfill import backfilled_rows
from .gpu_decode import GPU_MAX_PIXELS, GpuDecoder, decoder_for, embed_on_device
from .pipeline import Compressed, Decoded, Failed, decode_item, embed_batch, write_rows
from .plan import WorkItem, has_rows, known_gone, not_stored_meanwhile, plan, resolve_root
from .report import IndexReport, NoProgress, Progress

WRITE_EVERY = 256  # rows buffered before an upsert


def default_workers(encoder: Encoder) -> int:
    """Decode threads. A model on the GPU leaves the CPU to decoding, and one that fills the CPU
    leaves it between batches (decoded quickly on every core): one per core, as more threads
    were slower (benchmarks/gpu.py). A CPU model on fewer threads: one per two cores, beside it
    (draft decoding costs a fraction of an inference)."""
    return cpu_cores() if _on_gpu(encoder) or encoder.fills_cpu else max(1, cpu_cores() // 2)


def default_batch(encoder: Encoder) -> int:
    """Images per model call: large on a GPU (where fp16 ViT-B-32 reaches its rate), small on the
    CPU (larger batches are no faster there, and look further ahead in memory)."""
    return 256 if _on_gpu(encoder) else 16


def _on_gpu(encoder: Encoder) -> bool:
    return encoder.device.startswith("cuda")


class CpuTurns:
    """Decode threads and a model that fills every core take turns on the CPU.

    A decode running beside such a model delays one of its threads, and all the others then
    wait for that one at the next synchronisation point: the decode costs about twice its own
    CPU time (docs/speed.md measures both ways). Beside a GPU, or a model on fewer threads than
    cores, turns are off (``enabled``).
    """

    def __init__(self) -> None:
        self.enabled = False
        self._changed = threading.Condition()
        self._decoding = 0
        self._model_turn = False

    @contextlib.contextmanager
    def decoding(self) -> Iterator[None]:
        """One decode: waits while the model runs; the model waits for it to end."""
        if not self.enabled:
            yield
            return
        with self._changed:
            self._changed.wait_for(lambda: not self._model_turn)
            self._decoding += 1
        try:
            yield
        finally:
            with self._changed:
                self._decoding -= 1
                self._changed.notify_all()

    @contextlib.contextmanager
    def model(self) -> Iterator[None]:
        """One batch of inference: decodes in progress finish first, no new one starts."""
        if not self.enabled:
            yield
            return
        with self._changed:
            self._model_turn = True
            self._changed.wait_for(lambda: self._decoding == 0)
        try:
            yield
        finally:
            with self._changed:
                self._model_turn = False
                self._changed.notify_all()


class Indexer:
    """Runs the index of some folders into ``store`` on this machine."""

    def __init__(
        self,
        store: Store,
        get_encoder: Callable[[], Encoder],
        *,
        batch_size: int | None = None,
        workers: int | None = None,
        draft: bool = True,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
        decode: str = "auto",
        decode_device: str | None = None,
        gpu_max_pixels: int = GPU_MAX_PIXELS,
    ) -> None:
        """``decode``: where JPEGs are decoded (auto, cpu, gpu: :mod:`.gpu_decode`);
        ``decode_device``: the GPU path's device when not the model's (tests, benchmarks);
        ``gpu_max_pixels``: larger JPEGs stay on the CPU path."""
        self.store = store
        self._get_encoder = get_encoder  # loaded only when there is something to embed
        self.batch_size = max(1, batch_size) if batch_size else None  # None: default_batch()
        self.workers = workers  # None: default_workers()
        self._turns = CpuTurns()
        self.draft = draft
        self.progress = progress or NoProgress()
        self.stop = stop or threading.Event()
        self.decode = decode
        self.decode_device = decode_device
        self.gpu_max_pixels = gpu_max_pixels
        self.gpu_decoder: GpuDecoder | None = None

    def run(self, roots: Iterable[str]) -> IndexReport:
        started = time.perf_counter()
        report = IndexReport()
        folders = list(dict.fromkeys(resolve_root(root) for root in roots))
        report.roots = len(folders)
        todo, planned_on_rows = self._plan(folders, report)
        if todo and not self.stop.is_set():
            self._embed(todo, report, planned_on_rows)
        if not self.stop.is_set():
            self._prune(folders, report)
        report.interrupted = self.stop.is_set()
        self.store.flush()
        self.progress.finish()
        report.elapsed_s = time.perf_counter() - started
        return report

    def _plan(self, folders: Sequence[str], report: IndexReport) -> tuple[list[WorkItem], bool]:
        """The files to embed, and whether the store had rows to compare them with."""
        self.progress.scanning(0)  # shows that a scan is under way before the first image is found
        compare = has_rows(self.store)
        todo: list[WorkItem] = []
        chunks = plan(
            self.store,
            folders,
            report,
            compare=compare,
            stop=self.stop,
            hash_workers=self.workers or cpu_cores(),
            found=self.progress.scanning,
        )
        for chunk in chunks:
            if chunk.reused:
                write_rows(self.store, chunk.reused)
                self.store.delete(chunk.moved_from)
            if chunk.backfill:
                rows = backfilled_rows(self.store, chunk.backfill, self.workers or cpu_cores())
                report.backfilled += write_rows(self.store, rows)
            todo.extend(chunk.embed)
        return todo, compare

    def _embed(self, todo: list[WorkItem], report: IndexReport, planned_on_rows: bool) -> None:
        encoder = self._get_encoder()
        min_side = encoder.draft_side if self.draft else None
        self.gpu_decoder = decoder_for(encoder, self.decode, self.decode_device, min_side, self.gpu_max_pixels)
        batch_size = self.batch_size or default_batch(encoder)
        self.store.ensure(encoder.spec, encoder.dim)  # a new Lite file is made here, not before
        if not planned_on_rows and self.store.count() > 0:
            todo = not_stored_meanwhile(self.store, todo, report)  # another run made the index first
        self.progress.start_embedding(len(todo))
        started = time.perf_counter()
        pending: list[Row] = []
        batch: list[Decoded | Compressed] = []
        decoded_files = self._decode_all(todo, encoder, report, batch_size)
        for decoded in decoded_files:
            batch.append(decoded)
            if len(batch) >= batch_size:
                pending.extend(self._embed_batch(batch, encoder, report))
                batch = []
                if len(pending) >= WRITE_EVERY:
                    write_rows(self.store, pending)
                    pending = []
                if self.stop.is_set():
                    break  # stop after the batch in hand: files decoded ahead are dropped
        decoded_files.close()  # cancels the look-ahead still queued
        if batch:
            pending.extend(self._embed_batch(batch, encoder, report))
        write_rows(self.store, pending)
        report.embed_s = time.perf_counter() - started
        if self.gpu_decoder is not None:
            report.decoded_on = str(self.gpu_decoder.device)
            report.decoded_on_device = self.gpu_decoder.counts.on_device

    def _embed_batch(self, batch: list[Decoded | Compressed], encoder: Encoder, report: IndexReport) -> list[Row]:
        if self.gpu_decoder is not None:
            with self._turns.model():
                rows, embedded, failed = embed_on_device(encoder, self.gpu_decoder, batch)
            for failure in failed:
                report.failed.append((failure.path, failure.reason))
                self.progress.embedded(1)
            batch = embedded
        else:
            rows = embed_batch(encoder, batch, self._turns.model)  # type: ignore[arg-type]  # all Decoded
        updates = sum(decoded.item.is_update for decoded in batch)
        report.updated += updates
        report.new += len(batch) - updates
        report.embedded += len(batch)
        self.progress.embedded(len(batch))
        return rows

    def _decode_all(
        self, todo: list[WorkItem], encoder: Encoder, report: IndexReport, batch_size: int
    ) -> Iterator[Decoded | Compressed]:
        """Decode in a thread pool, at most ``lookahead`` files ahead of the model, in order
        (with a GPU decoder, the JPEGs it takes are read and hashed, and left compressed)."""
        min_side = encoder.draft_side if self.draft else None
        self._turns.enabled = encoder.fills_cpu
        workers = self.workers or default_workers(encoder)
        lookahead = max(2 * batch_size, 4 * workers)
        route = self.gpu_decoder.route if self.gpu_decoder is not None else None
        queue: deque[Future[Decoded | Compressed | Failed]] = deque()
        items = iter(todo)
        with ThreadPoolExecutor(workers, thread_name_prefix="pixfind-decode") as pool:
            try:
                while True:
                    while len(queue) < lookahead and not self.stop.is_set():
                        item = next(items, None)
                        if item is None:
                            break
                        queue.append(
                            pool.submit(decode_item, item, encoder.preprocess, min_side, self._turns.decoding, route)
                        )
                    if not queue:
                        return
                    result = queue.popleft().result()
                    if isinstance(result, Failed):
                        report.failed.append((result.path, result.reason))
                        self.progress.embedded(1)
                    else:
                        yield result
            finally:
                for future in queue:
                    future.cancel()

    def _prune(self, folders: Sequence[str], report: IndexReport) -> None:
        """Delete the rows under ``folders`` whose files are known to be gone; keep (and
        report) those that cannot be checked."""
        if not self.store.exists():
            return
        for folder in folders:
            gone = known_gone(self.store, folder, report)
            if gone:
                report.removed += self.store.delete(gone)
