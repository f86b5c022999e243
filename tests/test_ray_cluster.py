"""The local Ray cluster the distributed index runner is tested on: loopback only, the CPUs it
promises, and a Ray Data job that loses a node half-way and still returns every item once."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray_cluster import LocalRayCluster

ITEMS = 600
BLOCKS = 24


def outward_addresses() -> set[str]:
    """This machine's non-loopback IPv4 addresses: the source address of a route to each
    documentation network (a UDP connect sends nothing), and what the host name resolves to."""
    found = set()
    for target in ("192.0.2.1", "198.51.100.1", "203.0.113.1", "10.255.255.255"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
            sock.connect((target, 9))
            found.add(sock.getsockname()[0])
    with contextlib.suppress(OSError):
        found |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    return {addr for addr in found if not addr.startswith("127.")}


def connects(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        return sock.connect_ex((host, port)) == 0


def test_cluster_is_on_loopback_with_three_one_cpu_workers(local_ray: LocalRayCluster) -> None:
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert sorted(n["Resources"].get("CPU", 0) for n in nodes) == [0, 1, 1, 1]
    assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}
    assert ray.cluster_resources()["memory"] == local_ray.head_memory + 3 * local_ray.worker_memory

    # Every port the cluster listens on answers on 127.0.0.1 and refuses on the outward address.
    ports = local_ray.listening_ports()
    assert ports, "the cluster listens on no TCP port at all?"
    assert all(connects("127.0.0.1", port) for port in ports)
    outward = outward_addresses()
    assert outward, "no outward address found to probe"
    assert not [(addr, port) for addr in outward for port in ports if connects(addr, port)]


def test_ray_data_job_survives_a_node_removed_mid_run(local_ray: LocalRayCluster) -> None:
    import ray
    import ray.data

    def slow_identity(batch: dict) -> dict:  # long enough that the job is mid-run when a node goes
        time.sleep(0.3)
        node = ray.get_runtime_context().get_node_id()
        return {"id": batch["id"], "node": [node] * len(batch["id"])}

    ray.data.DataContext.get_current().enable_progress_bars = False
    dataset = ray.data.range(ITEMS, override_num_blocks=BLOCKS).map_batches(slow_identity, batch_size=None)
    seen: list[int] = []
    removed = None
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            seen.extend(batch["id"].tolist())
            if removed is None:  # the node that just finished a block is busy with the next one
                removed = local_ray.remove_worker(str(batch["node"][0]))
        assert removed is not None
        assert len(seen) == ITEMS and sorted(seen) == list(range(ITEMS))  # each item once
        assert local_ray.cpus() == 2
        assert removed not in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    finally:
        if removed is not None:
            local_ray.add_worker()
    assert local_ray.cpus() == 3


def test_a_folder_too_long_for_ray_sockets_is_refused_before_anything_starts(tmp_path: Path) -> None:
    folder = tmp_path / ("x" * 80)
    with pytest.raises(RuntimeError, match="too long for Ray's socket paths"):
        LocalRayCluster(folder=folder).start()


def test_a_head_that_fails_half_way_leaves_no_process_behind(tmp_path: Path) -> None:
    """The start's own error comes out, and what the head had started before failing is gone."""

    class FailingHead(LocalRayCluster):
        def _start_head(self) -> None:
            self.started = subprocess.Popen(["sleep", "60"])  # a GCS that came up before the raylet failed
            raise RuntimeError("raylet did not register")

    cluster = FailingHead()  # its own short folder under /tmp, removed at stop
    with pytest.raises(RuntimeError, match="raylet did not register"):
        cluster.start()
    assert cluster.started.wait(timeout=5) == -signal.SIGKILL


#: A process that, like this one, imports grpc_fork first, then talks gRPC and starts 1,000 children
#: with a preexec_fn (as Ray's Cluster does): it prints the exit codes of those that did not run.
GRPC_AND_CHILDREN = """
import subprocess, sys
from concurrent import futures
sys.path.insert(0, sys.argv[1])
import grpc_fork  # noqa: F401 - first, as conftest.py does
import grpc
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
channel = grpc.insecure_channel(f"127.0.0.1:{port}")
grpc.channel_ready_future(channel).result(timeout=10)
codes = [subprocess.Popen(["true"], preexec_fn=lambda: None).wait() for _ in range(1000)]
print(sorted(code for code in codes if code != 0))
"""


def test_children_started_with_preexec_fn_survive_a_live_grpc_channel() -> None:
    """Ray starts every node process with Popen(preexec_fn=...) from the test process, where
    pymilvus runs gRPC; with gRPC's fork handlers on, about one such child in a hundred dies before
    exec (tests/grpc_fork.py). Checked in a small process (forking this large one a thousand
    times would take minutes), from an environment without the switch: grpc_fork must set it."""
    import grpc_fork

    assert grpc_fork.HANDLERS_OFF and os.environ[grpc_fork.VARIABLE] == "false"  # this process too
    env = {name: value for name, value in os.environ.items() if name != grpc_fork.VARIABLE}
    tests = str(Path(__file__).resolve().parent)
    ran = subprocess.run(
        [sys.executable, "-c", GRPC_AND_CHILDREN, tests], env=env, capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    died = ran.stdout.strip()
    assert died == "[]", f"children died before running, exit codes {died}"
