"""gRPC's fork handlers off in the test process, so the children it starts live to ``exec``.

The test process talks gRPC (pymilvus, to Milvus Lite or a server) and also starts children
with ``subprocess.Popen(preexec_fn=...)``: Ray's ``cluster_utils.Cluster`` starts every node
process (GCS, raylet, dashboard) that way. A ``preexec_fn`` makes Python ``fork`` instead of
``vfork``, so gRPC's ``pthread_atfork`` child handler runs in the child and restarts its poller
thread there; once the child closes its inherited descriptors before ``exec``, that thread finds
its epoll descriptor gone and aborts the child (SIGABRT or SIGSEGV, about one fork in a hundred
with grpcio 1.85; grpc/grpc#43055). Python's ``Popen`` cannot tell a child that died before
``exec`` from one that ran, so a raylet that never started surfaces 30 s later as Ray's
"node timed out during startup".

``GRPC_ENABLE_FORK_SUPPORT=false`` is gRPC's documented switch for processes that always
``exec`` after ``fork``: no handlers run. gRPC reads it when it is first imported, so this
module sets it on import and must be imported before anything imports ``grpc``; the helpers that
start children check :data:`HANDLERS_OFF` rather than trusting the order of imports.
"""

from __future__ import annotations

import os
import sys

VARIABLE = "GRPC_ENABLE_FORK_SUPPORT"
#: False when grpc was imported before this module with its fork handlers still on.
HANDLERS_OFF = os.environ.get(VARIABLE, "").lower() in ("false", "0") or "grpc" not in sys.modules
os.environ[VARIABLE] = "false"


def require_handlers_off(what: str) -> None:
    """Fail clearly instead of letting ``what`` lose a child now and then."""
    if not HANDLERS_OFF:
        raise RuntimeError(
            f"{what}: grpc was imported before tests/grpc_fork.py turned its fork handlers off, so a "
            f"child started with preexec_fn may abort before exec; import grpc_fork first"
        )
