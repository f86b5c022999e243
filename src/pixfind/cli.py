"""The ``pixfind`` command: index, search, info, serve.

Every user-facing failure is a :class:`PixfindError`, printed as one line to stderr with a
non-zero exit code; nothing here prints a traceback unless ``PIXFIND_DEBUG=1``.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from .config import Settings, debug_enabled, precision_from
from .errors import PixfindError
from .limits import DEFAULT_RESULTS, MAX_RESULTS

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Find pictures by describing them. Index folders once, then search by text or by example image.",
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
if not out.is_terminal:
    out.width = 4096  # piped output: never fold a path across lines


def _show_version(asked: bool) -> None:
    if asked:
        from . import __version__

        out.print(f"pixfind {__version__}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_show_version, help="Print pixfind's version and exit."),
    ] = False,
) -> None:
    pass


# -- shared options --------------------------------------------------------------------------

UriOpt = Annotated[
    str | None,
    typer.Option("--uri", help="Index location: a .db file (Milvus Lite) or http://host:19530. Env: PIXFIND_URI."),
]
TokenOpt = Annotated[str | None, typer.Option("--token", help="Milvus token, e.g. user:password. Env: PIXFIND_TOKEN.")]
CollectionOpt = Annotated[str | None, typer.Option("--collection", help="Collection name. Env: PIXFIND_COLLECTION.")]
ModelOpt = Annotated[
    str | None, typer.Option("--model", help="open_clip architecture (default ViT-B-32). Env: PIXFIND_MODEL.")
]
PretrainedOpt = Annotated[
    str | None,
    typer.Option(
        "--pretrained",
        help="open_clip weights tag (default openai). 'none' = random weights from a fixed seed, "
        "for offline testing only: results are meaningless. Env: PIXFIND_PRETRAINED.",
    ),
]
CheckpointOpt = Annotated[
    Path | None, typer.Option("--checkpoint", help="Local weights file for --model. Env: PIXFIND_CHECKPOINT.")
]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="auto (CUDA if available, fp16), cpu, cuda, cuda:1. Env: PIXFIND_DEVICE.")
]
EfOpt = Annotated[
    int | None,
    typer.Option(
        "--ef",
        help="Milvus server search effort (HNSW ef, default 64): higher = better recall, slower. "
        "Env: PIXFIND_SEARCH_EF.",
    ),
]
WaitOpt = Annotated[
    bool, typer.Option("--wait", help="If another pixfind is using the embedded index, wait instead of failing.")
]


def _open(
    uri: str | None,
    token: str | None,
    collection: str | None,
    *,
    model: str | None = None,
    pretrained: str | None = None,
    checkpoint: Path | None = None,
    device: str | None = None,
    wait: bool = False,
    create: bool = True,
    **settings: Any,
) -> Any:
    from .api import ImageIndex

    base = Settings.from_env(**settings)
    return ImageIndex(
        uri=uri,
        token=token,
        collection=collection,
        model=model,
        pretrained=pretrained,
        checkpoint=str(checkpoint) if checkpoint else None,
        device=device,
        wait=wait,
        settings=base,
        create=create,
    )


# -- index -----------------------------------------------------------------------------------


@app.command()
def index(
    folders: Annotated[
        list[Path],
        # readable=False: an unreadable folder is reported by the run (its rows kept), not refused by click
        typer.Argument(help="Folders (or single images) to index.", show_default=False, readable=False),
    ],
    uri: UriOpt = None,
    token: TokenOpt = None,
    collection: CollectionOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    checkpoint: CheckpointOpt = None,
    device: DeviceOpt = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Images per model call.")] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Decode threads.")] = None,
    no_draft: Annotated[bool, typer.Option("--no-draft", help="Decode JPEGs at full size (slower, exact).")] = False,
    precision: Annotated[
        str | None,
        typer.Option(
            "--precision",
            help="CPU image model: auto (bf16 where the CPU has bf16 arithmetic, else f32), f32 or bf16. "
            "Env: PIXFIND_PRECISION.",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary.")] = False,
    report: Annotated[
        Path | None, typer.Option("--report", help="Write the run's summary and every failure as JSON.")
    ] = None,
    wait: WaitOpt = False,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="Embed on a Ray cluster: RAY_ADDRESS or this machine's (ray start --head), or --ray-address. "
            "Needs pip install 'pixfind[ray]'.",
        ),
    ] = False,
    ray_address: Annotated[
        str | None,
        typer.Option("--ray-address", help="The Ray cluster for --ray (implies it): HOST:6379 or ray://HOST:10001."),
    ] = None,
) -> None:
    """Embed every image under FOLDERS; re-runs only embed new or changed files and drop deleted ones."""
    if report:
        _check_writable(report, "--report")  # now, not after an hour of indexing
    stop = threading.Event()
    with _open(
        uri,
        token,
        collection,
        model=model,
        pretrained=pretrained,
        checkpoint=checkpoint,
        device=device,
        wait=wait,
        batch_size=batch_size,
        workers=workers,
        draft=False if no_draft else None,
        precision=precision_from(precision) if precision is not None else None,
    ) as idx:
        progress = RichProgress(disable=quiet or not err.is_terminal)
        # from here a Ctrl-C (also during the scan or the model load) stops after the current
        # batch and keeps what was written; before it there is nothing to save
        with _stop_on_sigint(stop):
            result = idx.add(*folders, progress=progress, stop=stop, ray=ray_address or ray)
        spec = idx.model_spec()
    if report:
        from .render import json_text

        try:
            report.write_text(json_text(result.to_dict()), encoding="utf-8")
        except OSError as exc:
            raise PixfindError(f"cannot write --report {report}: {exc.strerror or exc}") from exc
    if not quiet:
        from .render import summary_lines

        for line in summary_lines(result):
            _say(line)
        if result.embedded:  # said when vectors were made, not on every re-run
            _note_random_weights(spec)
    if result.interrupted:
        raise typer.Exit(130)
    if result.nothing_read:
        what = "the folder or file" if len(folders) == 1 else "any of the folders or files"
        raise PixfindError(f"nothing could be indexed from {what} given: see why above (--report FILE lists it too)")


def _check_writable(path: Path, option: str) -> None:
    """Refuse an output file that cannot be written, before the work that produces it."""
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise PixfindError(f"{option} {path} is a folder: give a file name, e.g. {path / 'run.json'}")
    if not folder.is_dir():
        raise PixfindError(f"{option} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PixfindError(f"{option} {path}: permission denied")


class RichProgress:
    """Progress for an index run: a counter while scanning, what is being done while the model
    loads (or is prepared for the CPU on a first run), then count, rate and ETA.

    The rate is the images done over the time since embedding began, first batch included (and
    the ETA follows from it): rich's own estimate, smoothed over the last few updates, showed
    34,207 img/s for 5 images embedded in one batch."""

    def __init__(self, disable: bool, console: Console | None = None, clock: Callable[[], float] | None = None) -> None:
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._clock = clock or time.monotonic
        self._bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[count]}"),  # done/total while embedding; the scan counts in its description
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[eta]}"),
            console=console or err,
            disable=disable,
            transient=False,
            get_time=self._clock,
        )
        self._task: Any = None
        self._started = False
        self._embedding_since = 0.0

    def scanning(self, found: int) -> None:
        self._ensure_task("scanning")
        self._bar.update(self._task, completed=found, description=f"scanning ({found:,} files)")

    def status(self, text: str) -> None:
        self._ensure_task(text)
        self._bar.update(self._task, description=text)
        self._bar.refresh()  # now: what follows may hold the CPU (and the GIL) for seconds

    def start_embedding(self, total: int) -> None:
        self._ensure_started()
        if self._task is not None:
            self._bar.remove_task(self._task)
        self._task = self._bar.add_task("embedding", total=total, count=f"0/{total:,}", rate="", eta="")
        self._embedding_since = self._clock()

    def embedded(self, count: int) -> None:
        if self._task is None:
            return
        self._bar.advance(self._task, count)
        task = self._bar.tasks[-1]
        self._bar.update(self._task, count=f"{int(task.completed):,}/{int(task.total or 0):,}")
        elapsed = self._clock() - self._embedding_since
        if elapsed <= 0:
            return
        rate = task.completed / elapsed
        left = max(0.0, (task.total or 0) - task.completed) / rate if rate else 0.0
        self._bar.update(self._task, rate=f"{rate:,.1f} img/s", eta=f"ETA {_clock_time(left)}")

    def finish(self) -> None:
        if self._started:
            self._bar.stop()
            self._started = False

    def _ensure_task(self, description: str) -> None:
        self._ensure_started()
        if self._task is None:
            self._task = self._bar.add_task(description, total=None, count="", rate="", eta="")

    def _ensure_started(self) -> None:
        if not self._started:
            self._bar.start()
            self._started = True


def _clock_time(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class _stop_on_sigint:
    """First Ctrl-C asks the run to stop after the current batch; a second one aborts."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt
        self.stop.set()
        err.print("stopping after the current batch (Ctrl-C again to abort)...", markup=False)

    def __enter__(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# -- watch -----------------------------------------------------------------------------------

PollOpt = Annotated[
    float | None,
    typer.Option(
        "--poll",
        min=0.5,
        help="Look at the folders every SECONDS instead of waiting for the system's file events "
        "(network drives, where none arrive).",
    ),
]


@app.command()
def watch(
    folders: Annotated[
        list[Path],
        typer.Argument(help="Folders (or single images) to index and keep current.", show_default=False),
    ],
    uri: UriOpt = None,
    token: TokenOpt = None,
    collection: CollectionOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    checkpoint: CheckpointOpt = None,
    device: DeviceOpt = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Images per model call.")] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Decode threads.")] = None,
    poll: PollOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summaries.")] = False,
    wait: WaitOpt = False,
) -> None:
    """Index FOLDERS, then keep the index current as files are added, changed, moved or deleted (Ctrl-C stops)."""
    from .ingest.watch import Watcher

    stop = threading.Event()
    with _open(
        uri,
        token,
        collection,
        model=model,
        pretrained=pretrained,
        checkpoint=checkpoint,
        device=device,
        wait=wait,
        batch_size=batch_size,
        workers=workers,
    ) as idx:
        watcher = Watcher(idx, [str(folder) for folder in folders], poll=poll)
        spec_noted = False

        def summarise(result: Any) -> None:
            nonlocal spec_noted
            if quiet:
                return
            from .render import summary_lines

            for line in summary_lines(result):
                _say(line)
            if result.embedded and not spec_noted:
                spec_noted = True
                _note_random_weights(idx.model_spec())

        with _stop_on_sigint(stop), _stop_on_sigterm(stop):
            watcher.start()  # before the first run: a file written meanwhile is not missed
            try:
                first = watcher.index_all(stop, RichProgress(disable=quiet or not err.is_terminal))
                summarise(first)
                if first.nothing_read:
                    what = "the folder or file" if len(folders) == 1 else "any of the folders or files"
                    raise PixfindError(f"nothing can be watched in {what} given: see why above")
                if not stop.is_set():
                    if not quiet:
                        where = str(folders[0]) if len(folders) == 1 else f"{len(folders)} folders"
                        _say(f"watching {where} for changes (Ctrl-C to stop)")
                    watcher.run(stop, summarise)
            finally:
                watcher.close()
    raise typer.Exit(130)


class _stop_on_sigterm:
    """SIGTERM (a service manager stopping ``pixfind watch``) stops it as Ctrl-C does."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self._previous: Any = None

    def __enter__(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self.stop.set())

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# -- remove ----------------------------------------------------------------------------------


@app.command()
def remove(
    paths: Annotated[
        list[Path],
        typer.Argument(help="Files or folders whose entries to drop (they may be gone).", show_default=False),
    ],
    uri: UriOpt = None,
    token: TokenOpt = None,
    collection: CollectionOpt = None,
    wait: WaitOpt = False,
) -> None:
    """Drop the index entries of these files and of everything under these folders, existing or not."""
    from .render import printable

    missing = []
    with _open(uri, token, collection, wait=wait, create=False) as idx:
        for path in paths:
            count = idx.remove(path)
            if not count:
                missing.append(printable(str(path)))
                continue
            noun = "image" if count == 1 else "images"
            out.print(f"removed {count:,} {noun} at or under {printable(str(path))}", markup=False, highlight=False)
    if missing:
        raise PixfindError(f"nothing in the index at or under {', '.join(missing)}: check the path")


# -- search ----------------------------------------------------------------------------------


@app.command()
def search(
    query: Annotated[
        list[str] | None,
        typer.Argument(
            help='What the picture shows, e.g. "a white dog". Terms combine with " + " and " - " '
            '(spaces around): "sunset + ./beach.jpg - people"; a term starting with / ./ ../ ~/ is an '
            "image file.",
            show_default=False,
        ),
    ] = None,
    image: Annotated[
        Path | None, typer.Option("--image", help="Search by example: images that look like this file.")
    ] = None,
    similar: Annotated[
        str | None, typer.Option("--similar", help="Images that look like this indexed file (no re-embedding).")
    ] = None,
    limit: Annotated[
        int, typer.Option("-k", "--limit", min=1, max=MAX_RESULTS, help="Number of results.")
    ] = DEFAULT_RESULTS,
    under: Annotated[str | None, typer.Option("--under", help="Only results inside this folder.")] = None,
    min_score: Annotated[
        float | None,
        typer.Option(
            "--min-score",
            help="Only hits at or above this cosine (-1 to 1). Default model: good text matches score "
            "about 0.2-0.35, near-identical images 0.9+.",
        ),
    ] = None,
    all_copies: Annotated[
        bool, typer.Option("--all", help="Show every copy of a file (default: exact copies are one hit).")
    ] = False,
    no_combine: Annotated[
        bool, typer.Option("--no-combine", help='Search for the text as written, " - " and " + " included.')
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print a JSON list of {rank, score, path, width, height, copies, copy_paths}."),
    ] = False,
    grid: Annotated[
        Path | None, typer.Option("--grid", help="Write a contact sheet of the hits (150 px tiles, 5 per row).")
    ] = None,
    uri: UriOpt = None,
    token: TokenOpt = None,
    collection: CollectionOpt = None,
    device: DeviceOpt = None,
    ef: EfOpt = None,
    wait: WaitOpt = False,
) -> None:
    """Find indexed images by a description, an example image, or an indexed file (never returned
    itself). Exact copies of a file are shown as one hit with their count (--all shows each)."""
    from .limits import check_min_score

    text = " ".join(query) if query else None
    given = [q for q in (text, image, similar) if q]
    if len(given) != 1:
        raise PixfindError(
            'give exactly one of: a text query, --image FILE or --similar PATH (e.g. pixfind search "a white dog")'
        )
    options = {"min_score": check_min_score(min_score), "all_copies": all_copies}
    server = _running_server(uri, collection)
    if server is not None:
        hits = _search_via_server(server, text, image, similar, limit, under, combine=not no_combine, **options)
        _show_hits(hits, as_json, grid, under, min_score)
        if hits and server.random_weights:
            _say(RANDOM_WEIGHTS_NOTE)
        return
    with _open(uri, token, collection, device=device, wait=wait, create=False, search_ef=ef) as idx:
        if text:
            hits = idx.search(text, limit=limit, under=under, combine=not no_combine, **options)
        elif image:
            hits = idx.search_image(image, limit=limit, under=under, **options)
        else:
            hits = idx.similar(str(similar), limit=limit, under=under, **options)
        # before closing: stopping Milvus Lite and exiting take 0.05-0.1 s
        _show_hits(hits, as_json, grid, under, min_score)
        if hits:
            _note_random_weights(idx.model_spec())


RANDOM_WEIGHTS_NOTE = "note: this index was built with random weights (--pretrained none): its rankings mean nothing"


def _note_random_weights(spec: Any) -> None:
    """Say once, on stderr, that an index of random-weight vectors ranks nothing: a user trying
    pixfind offline with PIXFIND_PRETRAINED=none may otherwise take its rankings as real."""
    if spec.weights == "none":
        _say(RANDOM_WEIGHTS_NOTE)


def _show_hits(
    hits: list[Any], as_json: bool, grid: Path | None, under: str | None = None, min_score: float | None = None
) -> None:
    if not hits:
        _print_hits(hits, as_json)
        _say(_why_no_matches(under, min_score))  # then an empty --grid is an error
    if grid:
        from .render import write_grid

        written = write_grid(hits, grid)
        _say(f"wrote {written} ({len(hits)} tiles)")
    if hits:
        _print_hits(hits, as_json)


def _why_no_matches(under: str | None, min_score: float | None = None) -> str:
    """The hint for an empty result: only a folder filter or a score cut-off can empty it (an
    empty index is an error)."""
    if min_score is not None and (not under or os.path.isdir(os.path.expanduser(under))):
        return f"no matches scoring {min_score:g} or more (a lower --min-score shows more)"
    if not under:
        return "no matches"
    where = os.path.expanduser(under)
    if os.path.isdir(where):
        return f"no matches: nothing in the index is under {under} (pixfind index {under} adds it)"
    if os.path.exists(where):
        from .ingest.scan import Presence, PresenceCheck

        is_image = PresenceCheck()(where).presence is Presence.PRESENT
        hint = f" (pictures like it: --similar {under})" if is_image else ""
        return f"no matches: --under takes a folder, and {under} is a file{hint}"
    return f"no matches: --under {under} does not exist (check the path)"


def _running_server(uri: str | None, collection: str | None) -> Any:
    """A ``pixfind serve`` running on the same embedded index (it holds the file), or None."""
    from .config import is_server_uri
    from .remote import find_server

    settings = Settings.from_env(uri=uri, collection=collection)
    if is_server_uri(settings.uri):
        return None  # a Milvus server is shared: no need to go through pixfind serve
    return find_server(settings.uri, settings.collection)


def _search_via_server(
    server: Any,
    query: str | None,
    image: Path | None,
    similar: str | None,
    limit: int,
    under: str | None,
    *,
    combine: bool = True,
    **options: Any,
) -> list[Any]:
    """Hits from a ``pixfind serve`` running on the same embedded index. A query with image
    terms sends them decoded here, as ``--image`` does (the server cannot read this user's files)."""
    from . import remote
    from .query import check_terms, parse_query
    from .search import candidate_paths, resolve_under

    folder = resolve_under(under)
    if query:
        terms = check_terms(parse_query(query, combine))
        if any(term.image is not None for term in terms):
            return remote.search_terms(server, terms, limit=limit, under=folder, **options)
        return remote.search(server, text=query.strip(), combine=combine, limit=limit, under=folder, **options)
    if image:
        return remote.search_image(server, image, limit=limit, under=folder, **options)
    return remote.search(server, similar=candidate_paths(str(similar))[1], limit=limit, under=folder, **options)


def _print_hits(hits: list[Any], as_json: bool) -> None:
    from .render import hits_json, hits_table

    if as_json:
        sys.stdout.write(hits_json(hits) + "\n")
    elif hits:
        out.print(hits_table(hits))


# -- info ------------------------------------------------------------------------------------


@app.command()
def info(
    uri: UriOpt = None,
    token: TokenOpt = None,
    collection: CollectionOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    wait: WaitOpt = False,
) -> None:
    """Where the index is, which model built it, how many images it holds, its size on disk."""
    server = _running_server(uri, collection)
    if server is not None:
        from .remote import info as remote_info

        data = remote_info(server)
    else:
        with _open(uri, token, collection, wait=wait, create=False) as idx:
            data = idx.info()
    if as_json:
        from .render import json_text

        sys.stdout.write(json_text(data) + "\n")
        return
    rows = [("index", data["uri"]), ("backend", data["backend"]), ("collection", data["collection"])]
    if data["exists"]:
        rows += [
            ("model", f"{data['model']} ({data['weights']})"),
            ("dimension", str(data["dim"])),
            ("images", f"{data['images']:,}"),
        ]
    else:
        rows.append(("images", "0 (not created yet: run pixfind index FOLDER)"))
    if "size_bytes" in data:
        rows.append(("size on disk", _human_bytes(data["size_bytes"])))
    rows.append(("cpu precision", "{precision} ({reason})".format(**data["cpu_precision"])))
    if data.get("watch"):  # a `pixfind serve --watch` answered
        watched = data["watch"]
        state = f"{watched['phase']}, {watched['batches']:,} batches"
        rows.append(("watching", f"{', '.join(watched['folders'])} ({state})"))
    from .render import printable

    for name, value in rows:
        out.print(f"{name:>13}  {printable(value)}", markup=False, highlight=False)


def _human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"


# -- serve -----------------------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[
        str,
        typer.Option(
            "--host", help="Address to listen on; 0.0.0.0 shares it with your network (a password is then required)."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0 picks a free one).")] = 8000,
    uri: UriOpt = None,
    token: TokenOpt = None,
    collection: CollectionOpt = None,
    device: DeviceOpt = None,
    ef: EfOpt = None,
    wait: WaitOpt = False,
    exact: Annotated[
        bool,
        typer.Option(
            "--exact",
            help="Keep exact search on an embedded index of 50,000+ images (else IVF while serving: "
            "~3x faster, recall@10 ~0.97).",
        ),
    ] = False,
    password_file: Annotated[
        Path | None,
        typer.Option(
            "--password-file",
            help="File whose first line is the password (user pixfind). Env: PIXFIND_SERVE_PASSWORD. "
            "Off loopback, one is made up and printed when none is given.",
        ),
    ] = None,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="Share on the network WITHOUT a password (trusted networks only).")
    ] = False,
    watch: Annotated[
        list[Path] | None,
        typer.Option(
            "--watch",
            help="Index this folder and keep it current while serving (repeat for more folders): "
            "the server is then the one writer of an embedded index, searched meanwhile.",
        ),
    ] = None,
    poll: PollOpt = None,
) -> None:
    """A web page and JSON API for searching the index, with the model loaded once."""
    from .web.access import read_password_file
    from .web.server import serve as run_server

    password = read_password_file(password_file) if password_file else None
    # --watch may make the index: a new one is created by its first run
    index = _open(uri, token, collection, device=device, wait=wait, create=bool(watch), search_ef=ef)
    run_server(
        index.settings,
        host=host,
        port=port,
        index=index,
        echo=_say,
        exact=exact,
        password=password,
        no_auth=no_auth,
        watch=[str(folder) for folder in watch or []],
        poll=poll,
    )


# -- duplicates -------------------------------------------------------------------------------


@app.command()
def duplicates(
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold",
            help="Cosine at or above which two images are duplicates (default 0.95; lower finds more, looser matches).",
        ),
    ] = None,
    under: Annotated[str | None, typer.Option("--under", help="Only images inside this folder.")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON: {threshold, groups: [{similarity, files: [...]}]}.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary.")] = False,
    uri: UriOpt = None,
    token: TokenOpt = None,
    collection: CollectionOpt = None,
    wait: WaitOpt = False,
) -> None:
    """Groups of near-identical images (copies, resized, re-encoded, lightly cropped), largest first."""
    from .countbar import CountBar
    from .duplicates import DEFAULT_THRESHOLD, check_threshold
    from .render import duplicates_table, human_bytes, json_text

    limit = check_threshold(DEFAULT_THRESHOLD if threshold is None else threshold)  # before opening the index
    with (
        _open(uri, token, collection, wait=wait, create=False) as idx,
        CountBar("looking for duplicates", "img", err, disable=quiet or not err.is_terminal) as bar,
    ):
        groups = idx.duplicates(limit, under=under, progress=bar.update, status=bar.status)
        bar.close()
        # shown before closing: a Lite file switched to IVF for the search takes seconds to switch back
        if as_json:
            sys.stdout.write(json_text({"threshold": limit, "groups": [g.to_dict() for g in groups]}) + "\n")
        elif groups:
            out.print(duplicates_table(groups))
        if not quiet:
            files = sum(len(g.files) for g in groups)
            freed = sum(g.reclaimable for g in groups)
            where = f" under {under}" if under else ""
            _say(
                f"{len(groups):,} group{'s' * (len(groups) != 1)} of duplicates{where} ({files:,} images; "
                f"{human_bytes(freed)} freed by keeping the first of each) at threshold {limit:g}"
            )
            if not groups and under and not os.path.isdir(os.path.expanduser(under)):
                _say(f"--under {under} is not a folder here: check the path")  # a typo, or a file
            _note_random_weights(idx.model_spec())


# -- export ----------------------------------------------------------------------------------


@app.command()
def export(
    output: Annotated[Path, typer.Argument(help="Parquet file to write, e.g. vectors.parquet.", show_default=False)],
    under: Annotated[str | None, typer.Option("--under", help="Only images inside this folder.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT if it exists.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary.")] = False,
    uri: UriOpt = None,
    token: TokenOpt = None,
    collection: CollectionOpt = None,
    wait: WaitOpt = False,
) -> None:
    """Write every stored vector with its path and record to a Parquet file (for pandas, pyarrow...)."""
    from .countbar import CountBar
    from .parquet import check_target
    from .render import format_duration

    check_target(output.expanduser().absolute(), force)  # before opening the index
    with (
        _open(uri, token, collection, wait=wait, create=False) as idx,
        CountBar("exporting", "rows", err, disable=quiet or not err.is_terminal) as bar,
    ):
        done = idx.export(output, under=under, force=force, progress=bar.update)
        bar.close()
        spec = idx.model_spec()
    if not quiet:
        _say(
            f"exported {done.rows:,} images to {done.path} in {format_duration(done.elapsed_s)} "
            f"({done.rows_per_s:,.0f} rows/s)"
        )
        _note_random_weights(spec)


# -- entry point -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors become one line on stderr and an exit code."""
    try:
        app(args=argv, prog_name="pixfind", standalone_mode=True)
    except SystemExit as exc:
        return int(exc.code or 0) if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except PixfindError as exc:
        _say(f"pixfind: error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("pixfind: interrupted", markup=False)
        return 130
    except Exception as exc:
        if debug_enabled():
            raise
        _say(f"pixfind: internal error: {type(exc).__name__}: {exc} (set PIXFIND_DEBUG=1 for details)")
        return 70
    return 0


def _say(line: str) -> None:
    """One line on stderr, as it is (no markup), with the names it quotes made harmless."""
    from .render import printable

    err.print(printable(line), markup=False, highlight=False)


def run() -> None:
    """Console-script entry point."""
    code = main()
    sys.stdout.flush()
    # The process ends here: spare it the final garbage collection over everything pymilvus and
    # ONNX Runtime allocated (~75 ms of a ~1.4 s cold search); atexit handlers still run.
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
