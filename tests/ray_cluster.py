"""A small multi-node Ray cluster on this machine, on 127.0.0.1 only, for tests and benchmarks.

``ray.cluster_utils.Cluster`` starts real Ray nodes (a GCS, one raylet per node, their agents)
as child processes of this one, so a test sees what a real cluster does when a node goes away.
What this module adds to it, and why:

* **Loopback only.** On Linux Ray gives every node the machine's outward address and its
  servers listen on every interface. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Ray's switch for
  single-machine clusters on Windows/macOS, honoured on Linux too) makes nodes and the driver use
  127.0.0.1; it is read when ``ray`` is imported, so it is set here before the import, and
  :meth:`LocalRayCluster.start` checks the result (every node at 127.0.0.1, every listening
  socket of the cluster's processes on loopback) instead of trusting it.
* **Bounded.** The head has no CPUs (work runs on the worker nodes only, as on a real
  cluster); each node is given ``memory`` and ``object_store_memory`` explicitly, or each would
  claim all of this machine's RAM. No dashboard, no metrics collection, no usage statistics.
* **Every node process starts.** Cluster starts nodes with ``Popen(preexec_fn=...)``; in a
  process where gRPC runs, gRPC's fork handler kills about one such child in a hundred before it
  runs (see ``grpc_fork``, imported here first and checked by :meth:`LocalRayCluster.start`).
* **Contained.** Ray's temporary folder (``RAY_TMPDIR``: sessions, logs, sockets, the
  address file) is the folder given, not ``/tmp/ray``; :meth:`LocalRayCluster.stop` checks that
  every process the cluster started is gone (and kills any that are not, then fails).

Run it by hand (prints start time, nodes and memory, then stops)::

    python tests/ray_cluster.py
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc_fork
import psutil

MIB = 1 << 20
#: Environment of the driver and (inherited) of every node process.
RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # nodes and driver on 127.0.0.1
    "RAY_USAGE_STATS_ENABLED": "0",
}
#: Node processes open Unix sockets under the session folder: Linux caps their paths at 107
#: bytes, and Ray adds up to ~69 to the folder given (``/ray/session_<date>_<time>_<pid>/sockets/plasma_store.N``).
MAX_FOLDER_CHARS = 38
LOOPBACK = {"127.0.0.1", "::1"}

os.environ.update(RAY_ENV)  # before anything imports ray: the switch is read at import


class RayClusterError(RuntimeError):
    """The local cluster did not start as promised, or left processes behind."""


@dataclass
class LocalRayCluster:
    """A head with no CPUs and ``workers`` worker nodes of ``cpus_per_worker`` CPUs each."""

    folder: Path | None = None  # Ray's temporary folder (None: a new one, removed at stop)
    workers: int = 3
    cpus_per_worker: int = 1
    worker_memory: int = 512 * MIB
    object_store_memory: int = 128 * MIB  # per node; Ray's minimum is 75 MiB
    head_memory: int = 256 * MIB
    start_s: float = 0.0
    cluster: Any = None
    worker_nodes: list[Any] = field(default_factory=list)
    _pids: set[int] = field(default_factory=set)
    #: The processes the cluster started directly (nodes' GCS, raylets, agents): the cluster is
    #: these and their descendants, never another child of this process (a Milvus server that
    #: the same test session started, say).
    _roots: set[int] = field(default_factory=set)
    _saved_env: dict[str, str | None] = field(default_factory=dict)
    _own_folder: bool = False
    _connected: bool = False  # this process is Ray's driver on this cluster

    def start(self) -> LocalRayCluster:
        grpc_fork.require_handlers_off("local Ray cluster")
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="pxray-"))
            self._own_folder = True
        if len(str(self.folder)) > MAX_FOLDER_CHARS:
            raise RayClusterError(
                f"Ray folder {self.folder} is too long for Ray's socket paths: give one of at most "
                f"{MAX_FOLDER_CHARS} characters"
            )
        self._set_env({**RAY_ENV, "RAY_TMPDIR": str(self.folder)})
        others = _children_of(os.getpid())
        began = time.monotonic()
        try:
            self._start_nodes(others)
            self.start_s = time.monotonic() - began
            self.check_loopback()
        except BaseException:
            with contextlib.suppress(RayClusterError):  # the error that stopped the start is the news
                self.stop()
            raise
        return self

    def _start_nodes(self, others: set[int]) -> None:
        import ray

        before = _children_of(os.getpid())
        try:
            self._start_head()
        finally:  # a head that failed half-way has left its GCS and monitors running: stop them too
            self._roots |= _children_of(os.getpid()) - before - others
        for _ in range(self.workers):
            self.add_worker()
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, log_to_driver=False, configure_logging=False)
        self._connected = True
        self._pids |= self._descendants()

    def _start_head(self) -> None:
        from ray.cluster_utils import Cluster

        assert self.folder is not None
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "memory": self.head_memory,
                "object_store_memory": self.object_store_memory,
                "include_dashboard": False,
                "temp_dir": str(self.folder / "ray"),  # RAY_TMPDIR/ray: where Ray puts its address file
                "_system_config": {
                    "enable_metrics_collection": False,
                    # A killed node is declared dead after period x threshold: 5 s, not Ray's 15 s.
                    "health_check_period_ms": 1000,
                    "health_check_failure_threshold": 5,
                },
            },
        )

    def add_worker(self) -> Any:
        before = _children_of(os.getpid())
        try:
            node = self.cluster.add_node(
                num_cpus=self.cpus_per_worker, memory=self.worker_memory, object_store_memory=self.object_store_memory
            )
        finally:
            self._roots |= _children_of(os.getpid()) - before
        self.worker_nodes.append(node)
        self._pids |= self._descendants()
        return node

    def remove_worker(self, node_id: str | None = None) -> str:
        """Kill one worker node (the one with this Ray node id, else the last added); its id."""
        node = next((n for n in self.worker_nodes if n.node_id == node_id), None) if node_id else None
        node = node or self.worker_nodes[-1]
        self._pids |= self._descendants()
        self.cluster.remove_node(node, allow_graceful=False)
        self.worker_nodes.remove(node)
        return str(node.node_id)

    # -- what the tests check -------------------------------------------------------------------

    def node_addresses(self) -> list[str]:
        import ray

        return [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]

    def listening_addresses(self) -> set[str]:
        """Addresses on which the cluster's processes (and this driver) accept TCP connections."""
        return {addr for addr, _ in self.listeners()}

    def listening_ports(self) -> set[int]:
        return {port for _, port in self.listeners()}

    def listeners(self) -> set[tuple[str, int]]:
        """(address, port) of every listening TCP socket of the cluster's processes and this driver."""
        found = set()
        for pid in self._descendants() | {os.getpid()}:
            with contextlib.suppress(psutil.Error):
                for conn in psutil.Process(pid).net_connections(kind="tcp"):
                    if conn.status == psutil.CONN_LISTEN:
                        found.add((_unmapped(conn.laddr.ip), conn.laddr.port))
        return found

    def check_loopback(self) -> None:
        nodes = self.node_addresses()
        outward = sorted(self.listening_addresses() - LOOPBACK)
        if any(addr != "127.0.0.1" for addr in nodes) or outward:
            raise RayClusterError(
                f"Ray cluster is not on loopback only (nodes at {nodes}, listening on {outward}): was ray "
                "imported before tests/ray_cluster.py set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0?"
            )

    def cpus(self) -> float:
        import ray

        return float(ray.cluster_resources().get("CPU", 0))

    def rss_bytes(self) -> int:
        """Resident memory of every process of the cluster, the driver included."""
        return sum(_rss(pid) for pid in self._descendants() | {os.getpid()})

    def pids(self) -> set[int]:
        return {pid for pid in self._pids | self._descendants() if _alive(pid)}

    # -- teardown -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Disconnect, remove every node, and check that no process of the cluster survived."""
        import ray

        self._pids |= self._descendants()
        if self._connected:  # never another cluster's driver connection (a start that failed early)
            ray.shutdown()
            self._connected = False
        shut_down = self.cluster is not None
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None
        self.worker_nodes.clear()
        # Processes of a head that never finished starting have no shutdown to wait for.
        survivors = _wait_gone(self._pids, 10.0 if shut_down else 0.0)
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
        self._pids.clear()
        self._roots.clear()
        self._restore_env()
        if self._own_folder and self.folder is not None:
            import shutil

            shutil.rmtree(self.folder, ignore_errors=True)
        if survivors:
            raise RayClusterError(f"Ray processes {sorted(survivors)} outlived the cluster's shutdown (killed)")

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers ------------------------------------------------------------------------------

    def _descendants(self) -> set[int]:
        """The cluster's live processes (see ``_roots``)."""
        found = {pid for pid in self._roots if _alive(pid)}
        for pid in self._roots:
            found |= _descendants(pid)
        return found

    def _set_env(self, values: dict[str, str]) -> None:
        for name, value in values.items():
            self._saved_env.setdefault(name, os.environ.get(name))
            os.environ[name] = value

    def _restore_env(self) -> None:
        for name, value in self._saved_env.items():
            if name in RAY_ENV:
                continue  # read once at import: keep it for any later cluster in this process
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env.clear()


def _unmapped(address: str) -> str:
    """``::ffff:127.0.0.1`` is loopback too: the IPv4 address inside an IPv4-mapped one."""
    with contextlib.suppress(ValueError):
        v6 = ipaddress.IPv6Address(address)
        return str(v6.ipv4_mapped or v6)
    return address


def _descendants(pid: int) -> set[int]:
    try:
        return {child.pid for child in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return set()


def _children_of(pid: int) -> set[int]:
    return {child.pid for child in psutil.Process(pid).children()}


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return False


def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while (alive := {pid for pid in pids if _alive(pid)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def _rss(pid: int) -> int:
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


def main() -> int:
    with LocalRayCluster() as local:
        print(f"Ray cluster up in {local.start_s:.1f} s: {local.cpus():.0f} CPUs on {local.node_addresses()}")
        print(f"listening on {sorted(local.listening_addresses())}; RSS {local.rss_bytes() / MIB:,.0f} MiB")
        pids = local.pids()
    still = {pid for pid in pids if _alive(pid)}
    print(f"stopped; {len(pids)} processes, {len(still)} left")
    return 1 if still else 0


if __name__ == "__main__":
    sys.exit(main())
