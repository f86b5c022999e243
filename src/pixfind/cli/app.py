"""The Typer app, its shared options and the entry point: every user-facing failure is a
:class:`~pixfind.errors.PixfindError`, printed as one line on stderr with a non-zero exit code;
nothing prints a traceback unless ``PIXFIND_DEBUG`` is set."""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from ..config import Settings, debug_enabled
from ..errors import PixfindError

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
        from .. import __version__

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
        help="Milvus server search effort (HNSW ef, default 128): higher = better recall, slower. "
        "Env: PIXFIND_SEARCH_EF.",
    ),
]
WaitOpt = Annotated[
    bool, typer.Option("--wait", help="If another pixfind is using the embedded index, wait instead of failing.")
]


def open_index(
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
    from ..api import ImageIndex

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


PollOpt = Annotated[
    float | None,
    typer.Option(
        "--poll",
        min=0.5,
        help="Look at the folders every SECONDS instead of waiting for the system's file events "
        "(network drives, where none arrive).",
    ),
]


# -- entry point -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors become one line on stderr and an exit code."""
    try:
        app(args=argv, prog_name="pixfind", standalone_mode=True)
    except SystemExit as exc:
        return int(exc.code or 0) if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except PixfindError as exc:
        say(f"pixfind: error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("pixfind: interrupted", markup=False)
        return 130
    except Exception as exc:
        if debug_enabled():
            raise
        say(f"pixfind: internal error: {type(exc).__name__}: {exc} (set PIXFIND_DEBUG=1 for details)")
        return 70
    return 0


RANDOM_WEIGHTS_NOTE = "note: this index was built with random weights (--pretrained none): its rankings mean nothing"


def note_random_weights(spec: Any) -> None:
    """Say once, on stderr, that an index of random-weight vectors ranks nothing: a user trying
    pixfind offline with PIXFIND_PRETRAINED=none may otherwise take its rankings as real."""
    if spec.weights == "none":
        say(RANDOM_WEIGHTS_NOTE)


def say(line: str) -> None:
    """One line on stderr, as it is (no markup), with the names it quotes made harmless."""
    from ..render import printable

    err.print(printable(line), markup=False, highlight=False)


def run() -> None:
    """Console-script entry point."""
    code = main()
    sys.stdout.flush()
    # The process ends here: spare it the final garbage collection over everything pymilvus and
    # ONNX Runtime allocated (~75 ms of a ~1.4 s cold search); atexit handlers still run.
    gc.freeze()
    sys.exit(code)
