"""``pixfind duplicates`` and ``pixfind export``: the whole library at once."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from .app import (
    CollectionOpt,
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
    from ..duplicates import DEFAULT_THRESHOLD, check_threshold
    from ..render import duplicates_table, human_bytes, json_text
    from .countbar import CountBar

    limit = check_threshold(DEFAULT_THRESHOLD if threshold is None else threshold)  # before opening the index
    with (
        open_index(uri, token, collection, wait=wait, create=False) as idx,
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
            say(
                f"{len(groups):,} group{'s' * (len(groups) != 1)} of duplicates{where} ({files:,} images; "
                f"{human_bytes(freed)} freed by keeping the first of each) at threshold {limit:g}"
            )
            if not groups and under and not os.path.isdir(os.path.expanduser(under)):
                say(f"--under {under} is not a folder here: check the path")  # a typo, or a file
            note_random_weights(idx.model_spec())


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
    from ..parquet import check_target
    from ..render import format_duration
    from .countbar import CountBar

    check_target(output.expanduser().absolute(), force)  # before opening the index
    with (
        open_index(uri, token, collection, wait=wait, create=False) as idx,
        CountBar("exporting", "rows", err, disable=quiet or not err.is_terminal) as bar,
    ):
        done = idx.export(output, under=under, force=force, progress=bar.update)
        bar.close()
        spec = idx.model_spec()
    if not quiet:
        say(
            f"exported {done.rows:,} images to {done.path} in {format_duration(done.elapsed_s)} "
            f"({done.rows_per_s:,.0f} rows/s)"
        )
        note_random_weights(spec)
