"""Tests for checking attached networks: CNI CHECK where it exists, a look inside otherwise."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from watcher.checkpoints import Checkpoint, NetworkRecord, Phase
from watcher.cni import CNIRuntime
from watcher.health import find_problem

BRIDGE_020 = {
    "cniVersion": "0.2.0",
    "name": "mynet",
    "plugins": [{"type": "bridge", "ipam": {"type": "host-local", "subnet": "10.36.0.0/16"}}],
}
LOOPBACK_020 = {"cniVersion": "0.2.0", "name": "lo", "plugins": [{"type": "loopback"}]}
RESULT_020 = {"cniVersion": "0.2.0", "ip4": {"ip": "10.36.0.7/16", "gateway": "10.36.0.1"}}


@pytest.fixture
def netns() -> Iterator[Path]:
    """A network namespace with lo up and a veth eth0 holding 10.36.0.7/16."""
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nsenter") is None:
        message = "needs root, ip and nsenter"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    name = f"cniw-health-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for command in (
            ["link", "set", "lo", "up"],
            ["link", "add", "eth0", "type", "veth", "peer", "name", "peer0"],
            ["link", "set", "peer0", "up"],
            ["addr", "add", "10.36.0.7/16", "dev", "eth0"],
            ["link", "set", "eth0", "up"],
        ):
            subprocess.run(["ip", "-n", name, *command], check=True)
        yield Path("/run/netns") / name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def checkpoint(netns: Path, *records: NetworkRecord) -> Checkpoint:
    return Checkpoint(
        namespace="example",
        container_id="web",
        cni_container_id="example--web",
        pid=1,
        netns=str(netns),
        phase=Phase.ATTACHED,
        networks=records,
    )


def record(name: str, ifname: str, config: dict[str, Any], result: Any) -> NetworkRecord:
    return NetworkRecord(name=name, ifname=ifname, config=config, result=result)


def ip(netns: Path, *args: str) -> None:
    subprocess.run(["ip", "-n", netns.name, *args], check=True)


@pytest.fixture
def cni(tmp_path: Path) -> CNIRuntime:
    return CNIRuntime([tmp_path], timeout=5.0)


async def test_healthy_020_attachment(netns: Path, cni: CNIRuntime) -> None:
    """An interface with its address and lo up report no problem."""
    attached = checkpoint(
        netns,
        record("mynet", "eth0", BRIDGE_020, RESULT_020),
        record("lo", "lo", LOOPBACK_020, {"cniVersion": "0.2.0"}),
    )

    assert await find_problem(cni, attached) is None


async def test_missing_address_found(netns: Path, cni: CNIRuntime) -> None:
    """An address that ADD reported but the interface lost is a problem."""
    ip(netns, "addr", "del", "10.36.0.7/16", "dev", "eth0")

    problem = await find_problem(
        cni, checkpoint(netns, record("mynet", "eth0", BRIDGE_020, RESULT_020))
    )

    assert problem == "network 'mynet' on eth0: address 10.36.0.7/16 is missing"


async def test_missing_interface_found(netns: Path, cni: CNIRuntime) -> None:
    """An interface that was deleted is a problem."""
    ip(netns, "link", "del", "eth0")

    problem = await find_problem(
        cni, checkpoint(netns, record("mynet", "eth0", BRIDGE_020, RESULT_020))
    )

    assert problem == "network 'mynet' on eth0: the interface is missing"


async def test_down_loopback_found(netns: Path, cni: CNIRuntime) -> None:
    """A loopback interface that is down is a problem."""
    ip(netns, "link", "set", "lo", "down")

    problem = await find_problem(
        cni, checkpoint(netns, record("lo", "lo", LOOPBACK_020, {"cniVersion": "0.2.0"}))
    )

    assert problem == "network 'lo' on lo: the interface is down"
