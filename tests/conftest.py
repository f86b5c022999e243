"""Shared fixtures: the session's Milvus server and the ``backend`` every store test runs on."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from milvus_server import MilvusServer

from pixfind.store import Store


@pytest.fixture(scope="session")
def milvus_server() -> Iterator[MilvusServer]:
    """A Milvus 2.3.5 standalone with authentication, on 127.0.0.1 only, for the whole session.

    When it cannot start (``.ci/server-setup.sh`` not run, no network namespace...), every test
    using it errors with the reason: server tests never skip.
    """
    server = MilvusServer(auth=True).start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Backend:
    """Where a test's collection lives: a Lite file, or a fresh collection on the server."""

    name: str
    uri: str
    token: str | None
    collection: str

    def store(self, **kwargs: object) -> Store:
        return Store(self.uri, token=self.token, collection=self.collection, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(params=["lite", pytest.param("server", marks=pytest.mark.server)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "lite":
        yield Backend("lite", str(tmp_path / "index.db"), None, "pixfind")
        return
    server: MilvusServer = request.getfixturevalue("milvus_server")
    chosen = Backend("server", server.uri, server.token, f"t_{uuid.uuid4().hex[:16]}")
    yield chosen
    with contextlib.suppress(Exception), chosen.store() as store:
        store.drop()
