"""``pixfind search`` and ``pixfind info``: asking the index (or a running ``pixfind serve``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ..config import Settings
from ..errors import PixfindError
from ..limits import DEFAULT_RESULTS, MAX_RESULTS
from .app import (
    RANDOM_WEIGHTS_NOTE,
    CollectionOpt,
    DeviceOpt,
    EfOpt,
    TokenOpt,
    UriOpt,
    WaitOpt,
    app,
    note_random_weights,
    open_index,
    out,
    say,
)


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
    after: Annotated[
        str | None,
        typer.Option(
            "--after",
            metavar="YYYY-MM-DD",
            help="Only photos taken on this day or later (EXIF date taken, else the file's mtime).",
            rich_help_panel="Filters",
        ),
    ] = None,
    before: Annotated[
        str | None,
        typer.Option(
            "--before",
            metavar="YYYY-MM-DD",
            help="Only photos taken on this day or earlier (the day itself included).",
            rich_help_panel="Filters",
        ),
    ] = None,
    camera: Annotated[
        str | None,
        typer.Option(
            "--camera",
            help="Only photos from a camera whose make and model have words starting with these (any case): "
            '"canon", "eos 5d", "iphone 12".',
            rich_help_panel="Filters",
        ),
    ] = None,
    file_type: Annotated[
        str | None,
        typer.Option(
            "--type",
            help="Only these file types, comma-separated: jpeg, png, webp, gif, bmp, tiff.",
            rich_help_panel="Filters",
        ),
    ] = None,
    orientation: Annotated[
        str | None,
        typer.Option("--orientation", help="Only landscape, portrait or square images.", rich_help_panel="Filters"),
    ] = None,
    min_width: Annotated[
        int | None,
        typer.Option(
            "--min-width", help="Only images at least this wide (pixels, as displayed).", rich_help_panel="Filters"
        ),
    ] = None,
    min_height: Annotated[
        int | None,
        typer.Option(
            "--min-height", help="Only images at least this tall (pixels, as displayed).", rich_help_panel="Filters"
        ),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print a JSON list of {rank, score, path, width, height, copies, copy_paths, taken, taken_from, "
            "camera, type}.",
        ),
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
    from ..filters import Filters
    from ..limits import check_min_score

    filters = Filters.of(
        after=after,
        before=before,
        camera=camera,
        types=file_type,
        orientation=orientation,
        min_width=min_width,
        min_height=min_height,
    )
    text = " ".join(query) if query else None
    given = [q for q in (text, image, similar) if q]
    if len(given) != 1:
        raise PixfindError(
            'give exactly one of: a text query, --image FILE or --similar PATH (e.g. pixfind search "a white dog")'
        )
    options: dict[str, Any] = {"min_score": check_min_score(min_score), "all_copies": all_copies}
    if filters:
        options["filters"] = filters
    server = _running_server(uri, collection)
    if server is not None:
        hits = _search_via_server(server, text, image, similar, limit, under, combine=not no_combine, **options)
        _show_hits(hits, as_json, grid, under, min_score, filters)
        if filters.needs_facts() and len(hits) < limit:
            from ..remote import info as remote_info

            _note_rows_without_facts(remote_info(server))
        if hits and server.random_weights:
            say(RANDOM_WEIGHTS_NOTE)
        return
    with open_index(uri, token, collection, device=device, wait=wait, create=False, search_ef=ef) as idx:
        if text:
            hits = idx.search(text, limit=limit, under=under, combine=not no_combine, **options)
        elif image:
            hits = idx.search_image(image, limit=limit, under=under, **options)
        else:
            hits = idx.similar(str(similar), limit=limit, under=under, **options)
        # before closing: stopping Milvus Lite and exiting take 0.05-0.1 s
        _show_hits(hits, as_json, grid, under, min_score, filters)
        if filters.needs_facts() and len(hits) < limit:
            _note_rows_without_facts({"images": idx.store.count(), "images_with_facts": idx.rows_with_facts()})
        if hits:
            note_random_weights(idx.model_spec())


def _show_hits(
    hits: list[Any],
    as_json: bool,
    grid: Path | None,
    under: str | None = None,
    min_score: float | None = None,
    filters: Any = None,
) -> None:
    if not hits:
        _print_hits(hits, as_json)
        why = _why_no_matches(under, min_score)
        if filters and why == "no matches":
            why = f"no matches for {filters.describe()} (fewer filters show more)"
        say(why)  # then an empty --grid is an error
    if grid:
        from ..render import write_grid

        written = write_grid(hits, grid)
        say(f"wrote {written} ({len(hits)} tiles)")
    if hits:
        _print_hits(hits, as_json)


def _note_rows_without_facts(data: dict[str, Any]) -> None:
    """Say on stderr when filters left out images indexed before dates and cameras were recorded."""
    missing = int(data.get("images", 0)) - int(data.get("images_with_facts", data.get("images", 0)))
    if missing > 0:
        say(
            f"note: {missing:,} indexed image{'s' * (missing != 1)} have no date, camera or type yet and "
            "are left out by these filters: run pixfind index on their folders again (no re-embedding)"
        )


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
        from ..ingest.scan import Presence, PresenceCheck

        is_image = PresenceCheck()(where).presence is Presence.PRESENT
        hint = f" (pictures like it: --similar {under})" if is_image else ""
        return f"no matches: --under takes a folder, and {under} is a file{hint}"
    return f"no matches: --under {under} does not exist (check the path)"


def _running_server(uri: str | None, collection: str | None) -> Any:
    """A ``pixfind serve`` running on the same embedded index (it holds the file), or None."""
    from ..config import is_server_uri
    from ..remote import find_server

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
    from .. import remote
    from ..query import check_terms, parse_query
    from ..search import candidate_paths, resolve_under

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
    from ..render import hits_json, hits_table

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
        from ..remote import info as remote_info

        data = remote_info(server)
    else:
        with open_index(uri, token, collection, wait=wait, create=False) as idx:
            data = idx.info()
    if as_json:
        from ..render import json_text

        sys.stdout.write(json_text(data) + "\n")
        return
    rows = [("index", data["uri"]), ("backend", data["backend"]), ("collection", data["collection"])]
    if data["exists"]:
        rows += [
            ("model", f"{data['model']} ({data['weights']})"),
            ("dimension", str(data["dim"])),
            ("images", f"{data['images']:,}"),
        ]
        if "images_with_facts" in data:
            missing = data["images"] - data["images_with_facts"]
            hint = f" ({missing:,} without: pixfind index adds them)" if missing else ""
            rows.append(("filter fields", f"{data['images_with_facts']:,} images{hint}"))
    else:
        rows.append(("images", "0 (not created yet: run pixfind index FOLDER)"))
    if "size_bytes" in data:
        from ..render import human_bytes

        rows.append(("size on disk", human_bytes(data["size_bytes"])))
    rows.append(("cpu precision", "{precision} ({reason})".format(**data["cpu_precision"])))
    if data.get("watch"):  # a `pixfind serve --watch` answered
        watched = data["watch"]
        state = f"{watched['phase']}, {watched['batches']:,} batches"
        rows.append(("watching", f"{', '.join(watched['folders'])} ({state})"))
    from ..render import printable

    for name, value in rows:
        out.print(f"{name:>13}  {printable(value)}", markup=False, highlight=False)
