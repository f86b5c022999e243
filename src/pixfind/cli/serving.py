"""``pixfind serve``: the web page and JSON API."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import (
    CollectionOpt,
    DeviceOpt,
    EfOpt,
    PollOpt,
    TokenOpt,
    UriOpt,
    WaitOpt,
    app,
    open_index,
    say,
)

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
    from ..web.access import read_password_file
    from ..web.server import serve as run_server

    password = read_password_file(password_file) if password_file else None
    # --watch may make the index: a new one is created by its first run
    index = open_index(uri, token, collection, device=device, wait=wait, create=bool(watch), search_ef=ef)
    run_server(
        index.settings,
        host=host,
        port=port,
        index=index,
        echo=say,
        exact=exact,
        password=password,
        no_auth=no_auth,
        watch=[str(folder) for folder in watch or []],
        poll=poll,
    )


# -- duplicates -------------------------------------------------------------------------------
