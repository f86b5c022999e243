"""``pixfind index``, ``pixfind watch`` and ``pixfind remove``: what goes into the index."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from ..config import decode_mode_from, precision_from
from ..errors import PixfindError
from .app import (
    CheckpointOpt,
    CollectionOpt,
    DeviceOpt,
    ModelOpt,
    PollOpt,
    PretrainedOpt,
    TokenOpt,
    UriOpt,
    WaitOpt,
    app,
    err,
    note_random_weights,
    open_index,
    out,
    say,
)
from .progress import RichProgress, stop_on_sigint, stop_on_sigterm

DecodeOpt = Annotated[
    str | None,
    typer.Option(
        "--decode",
        help="Where JPEGs are decoded: auto (on the GPU beside a CUDA model, else the CPU), cpu or gpu. "
        "Env: PIXFIND_DECODE.",
    ),
]


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
    decode: DecodeOpt = None,
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
    with open_index(
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
        decode=decode_mode_from(decode) if decode is not None else None,
    ) as idx:
        progress = RichProgress(disable=quiet or not err.is_terminal)
        # from here a Ctrl-C (also during the scan or the model load) stops after the current
        # batch and keeps what was written; before it there is nothing to save
        with stop_on_sigint(stop):
            result = idx.add(*folders, progress=progress, stop=stop, ray=ray_address or ray)
        spec = idx.model_spec()
    if report:
        from ..render import json_text

        try:
            report.write_text(json_text(result.to_dict()), encoding="utf-8")
        except OSError as exc:
            raise PixfindError(f"cannot write --report {report}: {exc.strerror or exc}") from exc
    if not quiet:
        from ..render import summary_lines

        for line in summary_lines(result):
            say(line)
        if result.embedded:  # said when vectors were made, not on every re-run
            note_random_weights(spec)
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
    decode: DecodeOpt = None,
    poll: PollOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summaries.")] = False,
    wait: WaitOpt = False,
) -> None:
    """Index FOLDERS, then keep the index current as files are added, changed, moved or deleted (Ctrl-C stops)."""
    from ..ingest.watch import Watcher

    stop = threading.Event()
    with open_index(
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
        decode=decode_mode_from(decode) if decode is not None else None,
    ) as idx:
        watcher = Watcher(idx, [str(folder) for folder in folders], poll=poll)
        spec_noted = False

        def summarise(result: Any) -> None:
            nonlocal spec_noted
            if quiet:
                return
            from ..render import summary_lines

            for line in summary_lines(result):
                say(line)
            if result.embedded and not spec_noted:
                spec_noted = True
                note_random_weights(idx.model_spec())

        with stop_on_sigint(stop), stop_on_sigterm(stop):
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
                        say(f"watching {where} for changes (Ctrl-C to stop)")
                    watcher.run(stop, summarise)
            finally:
                watcher.close()
    raise typer.Exit(130)


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
    from ..render import printable

    missing = []
    with open_index(uri, token, collection, wait=wait, create=False) as idx:
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
