"""The index run on a Ray cluster: the local run's plan and prune, its embedding spread over nodes.

The driver (this process) scans and plans exactly as :class:`~pixfind.ingest.runner.Indexer`
does (incremental, moves and copies reused by content hash, rows of known-gone files pruned), so
only the embedding differs. The files to embed are written as a Parquet manifest (Ray's own
``read_images`` over many paths is slow to start) and flow through Ray Data::

    read_parquet ─► map_batches(decode_rows)   CPU tasks: pipeline.decode_item per file,
                                               failures as a column
                 ─► map_batches(Embedder)      an actor pool: the encoder loaded once per actor
                                               through pixfind.models.load, pipeline.embed_batch
                 ─► MilvusSink (a Datasink)    pipeline.write_rows into a Milvus server, or
                    or the driver's loop       (Milvus Lite) the driver writes what it iterates

Exactly once: rows are upserted by path, so a task Ray retries after a node loss (decode, embed
or write) replaces what its first attempt may have written; a run repeated after the driver
died skips what was stored (the plan sees it unchanged).

Milvus Lite is one process's file (pixfind's lock and the engine's own), on the driver's disk:
with a Lite URI the driver itself writes the rows it receives (``iter_batches``); with a server
URI the workers write. The decode tasks do not load the model: they crop to the model's input
size (``resize_crop``, the pixel contract), read from open_clip's configuration; the embedder
hands each crop to its encoder's own ``preprocess`` (the identity for uint8 runtimes, the
transform's float output for torch on the CPU), so the vectors are a local run's.

The image files must be readable at the same paths on every node (a shared file system), and
the driver must run on a node of the cluster (it reads the manifest there), not through ``ray://``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..config import ModelSpec, Settings
from ..errors import PixfindError
from ..models.pixels import draft_side_for
from ..store import Store
from .pipeline import write_rows
from .plan import WorkItem, not_stored_meanwhile
from .ray_stages import Embedder, ModelShape, ProgressCounter, decode_rows, make_sink, outcome_of
from .report import IndexReport, Progress
from .runner import Indexer

if TYPE_CHECKING:
    from ..models.base import Encoder

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'pixfind[ray]'"
MANIFEST_ROWS = 10_000  # work items per Parquet file of the manifest
#: Bytes of Ray's ``memory`` resource reserved per embedder actor: what a ViT-B-32 model and its
#: batches hold. Also what keeps the actor stage from fusing with the decode tasks (see _dataset).
EMBED_MEMORY = 384 << 20
POLL_S = 1.0  # how often the driver asks how far the workers got (server runs)


@dataclass(frozen=True)
class RayOptions:
    """How the embedding is spread. ``address``: a Ray address (``host:6379``, ``ray://host:10001``)
    or "" for ``$RAY_ADDRESS`` or the cluster this machine belongs to."""

    address: str = ""
    decode_batch: int = 16  # files per decode task: small blocks keep every CPU busy
    embed_batch: int | None = None  # images per model call (None: 256 with GPUs, else 16)
    actors: int | None = None  # embedder actors (None: one per GPU, else one)
    actor_cpus: float = 1.0  # CPUs reserved per embedder actor
    #: Model threads per actor on a CPU (None: the settings' threads, else one per reserved CPU):
    #: more than its CPUs and inference fights the decode tasks for the cores.
    threads: int | None = None
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    actor_memory: int = EMBED_MEMORY
    #: A folder every node reads at the same path (the work list is written there, in a folder of
    #: its own, removed after the run); None: a temporary folder on the driver, read on its node.
    manifest_dir: str | None = None


def import_ray() -> Any:
    """``ray`` with Ray Data, or one line naming the extra to install."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise PixfindError(f"--ray needs Ray Data, which is not installed ({exc}): {INSTALL_HINT}") from None
    return ray


def model_shape(spec: ModelSpec) -> ModelShape:
    """Input size and vector size from open_clip's model configuration: no weights loaded on the
    driver (which may have no GPU); each embedder checks them against the model it loads."""
    from ..models.weights import import_open_clip

    config = import_open_clip().get_model_config(spec.name)
    if not config:
        raise PixfindError(f"unknown model {spec.name!r} for --ray: choose an open_clip architecture")
    size = config["vision_cfg"].get("image_size", 224)
    return ModelShape(int(size[0] if isinstance(size, (list, tuple)) else size), int(config["embed_dim"]))


# -- the runner -----------------------------------------------------------------------------------


class RayIndexer(Indexer):
    """:class:`Indexer` whose embedding runs on a Ray cluster (see the module's docstring)."""

    def __init__(
        self,
        store: Store,
        spec: ModelSpec,
        settings: Settings,
        options: RayOptions,
        *,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
        workers: int | None = None,
    ) -> None:
        super().__init__(
            store, self._no_local_model, workers=workers, draft=settings.draft, progress=progress, stop=stop
        )
        self.spec = spec
        self.settings = settings
        self.options = options
        self.ray = import_ray()  # before any scan: a missing extra is one line at once
        self._polled = 0  # rows the workers reported done (server runs)

    @staticmethod
    def _no_local_model() -> Encoder:
        raise AssertionError("a Ray run loads the model on the cluster")

    def _embed(self, todo: list[WorkItem], report: IndexReport, planned_on_rows: bool) -> None:
        shape = model_shape(self.spec)
        self.progress.status(f"connecting to Ray{' at ' + self.options.address if self.options.address else ''}")
        where = self.options.manifest_dir
        with self._connected(), tempfile.TemporaryDirectory(prefix="pixfind-manifest-", dir=where) as folder:
            self.store.ensure(self.spec, shape.dim)  # a new Lite file only once the cluster answered
            if not planned_on_rows and self.store.count() > 0:
                todo = not_stored_meanwhile(self.store, todo, report)
            if not todo:
                return
            dataset = self._dataset(write_manifest(todo, folder), shape)
            self.progress.start_embedding(len(todo))
            started = time.perf_counter()
            if self.store.is_server:
                self._write_on_workers(dataset, report, len(todo))
            else:
                self._write_from_driver(dataset, report)
            report.embed_s = time.perf_counter() - started

    @contextlib.contextmanager
    def _connected(self) -> Iterator[None]:
        """Joined to the cluster for the run (an already connected process keeps its connection)."""
        ray = self.ray
        if ray.is_initialized():
            yield
            return
        check_reachable(self.options.address)
        try:
            ray.init(address=self.options.address or "auto", log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            if self.options.address:
                found = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise PixfindError(f"cannot join the Ray cluster at {self.options.address}: {found}") from None
            raise PixfindError(
                "no Ray cluster found (RAY_ADDRESS is unset and none runs on this machine): start one "
                "(ray start --head) or give its address: --ray-address HOST:6379"
            ) from None
        try:
            yield
        finally:
            ray.shutdown()

    def _dataset(self, manifest: str, shape: ModelShape) -> Any:
        import ray.data

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # pixfind's own progress line says it
        # Ray's advice on memory reservations would break into the progress line; the
        # reservation is a scheduling figure, documented with RayOptions.actor_memory.
        context.issue_detectors_config.detectors = []
        logging.getLogger("ray.data").setLevel(
            logging.ERROR
        )  # its start lines and notices would break the progress line
        gpus = self._gpus_per_actor()
        actors = self.options.actors or (max(1, int(self.ray.cluster_resources().get("GPU", 0))) if gpus else 1)
        embed_batch_size = self.options.embed_batch or self.settings.batch_size or (256 if gpus else 16)
        min_side = draft_side_for(shape.image_size) if self.draft else None
        model_settings = self.settings
        threads = self.options.threads or self.settings.threads
        if not gpus:
            model_settings = replace(model_settings, threads=threads or max(1, int(self.options.actor_cpus)))
        self._check_room(gpus)
        # A manifest on the driver's own disk (local://) is read on the driver's node, by tasks that
        # need no CPU there (a head node commonly offers none). Ray Data deprecates local:// for
        # 2027: RayOptions.manifest_dir on shared storage is the lasting way.
        shared = self.options.manifest_dir is not None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*local://.*deprecated", category=DeprecationWarning)
            dataset = ray.data.read_parquet(manifest if shared else f"local://{manifest}", num_cpus=0)
        dataset = dataset.repartition(target_num_rows_per_block=self.options.decode_batch)
        dataset = dataset.map_batches(
            decode_rows,
            fn_kwargs={"image_size": shape.image_size, "min_side": min_side},
            batch_size=self.options.decode_batch,
            num_cpus=1,
        )
        # A memory reservation of its own keeps the embedder from being fused with the decode
        # tasks (stages with equal resources fuse: decoding would then run inside the actors).
        return dataset.map_batches(
            Embedder,
            fn_constructor_kwargs={"spec": self.spec, "settings": model_settings, "shape": shape},
            batch_size=embed_batch_size,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=self.options.actor_cpus,
            num_gpus=gpus,
            memory=self.options.actor_memory,
        )

    def _check_room(self, gpus: float) -> None:
        """Refuse at once a cluster where no node can hold an embedder (Ray would wait forever)."""
        need = {"CPU": self.options.actor_cpus, "GPU": gpus, "memory": self.options.actor_memory}
        for node in self.ray.nodes():
            have = node.get("Resources", {})
            if node.get("Alive") and all(have.get(name, 0) >= amount for name, amount in need.items() if amount):
                return
        raise PixfindError(
            f"no node of the Ray cluster can run the model: each embedder needs {self.options.actor_cpus:g} CPU, "
            f"{gpus:g} GPU and {self.options.actor_memory >> 20} MiB of Ray memory: add a node with that much free"
        )

    def _gpus_per_actor(self) -> float:
        if self.options.gpus_per_actor is not None:
            return self.options.gpus_per_actor
        return 1.0 if self.ray.cluster_resources().get("GPU", 0) >= 1 else 0.0

    def _write_from_driver(self, dataset: Any, report: IndexReport) -> None:
        """Milvus Lite: the driver holds the file, so it writes what the cluster embedded."""
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            outcome = outcome_of(batch)
            write_rows(self.store, outcome.rows)
            self._count(report, len(outcome.rows), outcome.updates, outcome.failed)
            self.progress.embedded(len(outcome.rows) + len(outcome.failed))
            if self.stop.is_set():
                break  # what was written stays; the next run embeds the rest

    def _write_on_workers(self, dataset: Any, report: IndexReport, total: int) -> None:
        """A Milvus server: each block is upserted by the worker that holds it; the driver polls
        a counter for progress, and a stop request interrupts the job (when this is the main
        thread, where Ray Data can be interrupted)."""
        ray = self.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        name = f"pixfind-progress-{uuid.uuid4().hex[:12]}"
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        counter = ray.remote(ProgressCounter).options(name=name, num_cpus=0, scheduling_strategy=here).remote()
        sink = make_sink(self.store.uri, self.store.token, self.store.collection, name)
        finished = threading.Event()
        on_main = threading.current_thread() is threading.main_thread()
        watcher = threading.Thread(target=self._watch, args=(counter, total, finished, on_main), daemon=True)
        watcher.start()
        try:
            dataset.write_datasink(sink)
        except KeyboardInterrupt:
            if not self.stop.is_set():
                raise
        finally:
            finished.set()
            watcher.join()
            with contextlib.suppress(Exception):
                ray.kill(counter)
        if sink.complete:
            self._count(report, sink.written, sink.updates, sink.failed)
        else:  # interrupted: what the counter saw (rows are stored; the next run skips them)
            report.embedded = min(self._polled, total)

    def _watch(self, counter: Any, total: int, finished: threading.Event, on_main: bool) -> None:
        """Progress from the counter; on a stop request, interrupt the job (Ray Data stops its
        tasks when the thread waiting for it is interrupted; only the main thread can be)."""
        import _thread

        interrupted = False
        shown = 0
        while not finished.wait(POLL_S):
            with contextlib.suppress(Exception):
                self._polled = min(total, self.ray.get(counter.get.remote(), timeout=10))
            if self._polled > shown:
                self.progress.embedded(self._polled - shown)
                shown = self._polled
            if self.stop.is_set() and on_main and not interrupted:
                interrupted = True
                _thread.interrupt_main()

    def _count(self, report: IndexReport, written: int, updates: int, failed: Sequence[tuple[str, str]]) -> None:
        report.embedded += written
        report.updated += updates
        report.new += written - updates
        report.failed.extend(failed)


def write_manifest(todo: Sequence[WorkItem], folder: str) -> str:
    """The work list as Parquet files in ``folder`` (returned): what each decode task reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for part, start in enumerate(range(0, len(todo), MANIFEST_ROWS)):
        items = todo[start : start + MANIFEST_ROWS]
        table = pa.table(
            {
                "path": [item.entry.path for item in items],
                "key": [item.key for item in items],
                "size": pa.array([item.entry.size for item in items], pa.int64()),
                "mtime_ns": pa.array([item.entry.mtime_ns for item in items], pa.int64()),
                "is_update": [item.is_update for item in items],
            }
        )
        pq.write_table(table, os.path.join(folder, f"part-{part:05d}.parquet"))
    return folder


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A ``HOST:PORT`` that does not answer is one line now: Ray itself retries for minutes."""
    if not address or "://" in address or address == "auto" or ":" not in address:
        return
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return
    except (OSError, ValueError) as exc:
        raise PixfindError(
            f"no Ray cluster answers at {address} ({exc}): check the address (the head's GCS port, 6379 by default)"
        ) from None


def ray_options(ray: bool | str | RayOptions) -> RayOptions:
    """The API's ``ray=`` argument: True for ``$RAY_ADDRESS`` or this machine's cluster, an
    address, or the options themselves."""
    if isinstance(ray, RayOptions):
        return ray
    return RayOptions(address="" if ray is True else str(ray).strip())
