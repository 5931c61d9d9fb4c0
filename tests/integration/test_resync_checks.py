"""Resync checks that repair broken attachments, and host port conflicts between containers."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.cni_helpers import remove_portmap_shared_chains
from tests.integration.harness import (
    BRIDGE,
    SUBNET,
    Daemon,
    WatcherEnv,
    assert_no_leaks,
    bridge_veths,
    container_addresses,
    container_links,
    leases,
    nat_chain,
    nat_rules,
    remove_bridge,
    run,
    wait_for,
)

NETWORKS = {"cni-watcher/networks": "mynet,lo"}
# A port chain that published ports need; the network name is the test's own.
PUBLISHED: dict[str, Any] = {
    "cniVersion": "1.0.0",
    "name": "published",
    "plugins": [
        {
            "type": "bridge",
            "bridge": "PLACEHOLDER",
            "isGateway": True,
            "ipMasq": True,
            "ipam": {"type": "host-local", "subnet": "PLACEHOLDER"},
        },
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ],
}
HOST_PORT = 18090


@pytest.fixture
def fast_resync(env: WatcherEnv) -> Iterator[WatcherEnv]:
    """The test environment with a resync every second."""
    env.resync_interval = "1s"
    env.write_config()
    yield env


def test_removed_veth_repaired(fast_resync: WatcherEnv, daemon: Daemon) -> None:
    """A container whose veth was deleted by hand gets eth0 back at the next resync."""
    env = fast_resync
    pid = env.containerd.start_container("example", "web", NETWORKS)
    env.wait_attached("example", "web")
    [old_address] = container_addresses(pid)
    [veth] = bridge_veths()

    run(["ip", "link", "delete", veth])
    line = daemon.wait_for_log("container.check_failed", container_id="web", timeout=15)
    assert "eth0" in line["problem"]
    assert line["restored_for_del"] == ["eth0"]
    env.wait_attached("example", "web")

    [new_address] = wait_for(lambda: container_addresses(pid), 15, "eth0 to come back")
    assert ipaddress.ip_interface(new_address).ip in SUBNET
    assert len(leases(env)) == 1
    assert len(bridge_veths()) == 1
    # DEL of the broken setup removed the old address's masquerade rule, so
    # only the new address has one.
    masquerade_sources = [
        rule.split()[3] for rule in nat_rules() if rule.startswith("-A POSTROUTING -s")
    ]
    assert masquerade_sources == [ipaddress.ip_interface(new_address).ip.exploded + "/32"]
    assert old_address

    env.containerd.remove("example", "web")
    env.wait_detached("example", "web")
    assert_no_leaks(env, ["example--web"])
    assert [line for line in nat_rules() if nat_chain("mynet", "example--web") in line] == []


@pytest.fixture
def published(env: WatcherEnv) -> Iterator[str]:
    """A 1.0.0 bridge and portmap network on its own bridge, removed afterwards."""
    bridge = (BRIDGE + "p")[:15]
    network = {**PUBLISHED, "plugins": [dict(plugin) for plugin in PUBLISHED["plugins"]]}
    network["plugins"][0].update(
        bridge=bridge, ipam={"type": "host-local", "subnet": str(_next_subnet())}
    )
    env.write_network("20-published.conflist", network)
    yield "published"
    remove_bridge(bridge)
    remove_portmap_shared_chains()


def test_host_port_conflict_rejected(env: WatcherEnv, published: str, daemon: Daemon) -> None:
    """A second container asking for a published host port is rejected with the holder named."""
    labels = {"cni-watcher/networks": published, "cni-watcher/ports": f"{HOST_PORT}:80/tcp"}
    env.containerd.start_container("example", "first", labels)
    env.wait_attached("example", "first")

    second = env.containerd.start_container("example", "second", labels)
    line = daemon.wait_for_log("container.label_invalid", container_id="second")

    assert line["label"] == "cni-watcher/ports"
    assert line["value"] == f"{HOST_PORT}:80/tcp"
    assert line["reason"] == (
        f"host port {HOST_PORT}/tcp is already published by container example/first"
    )
    assert env.checkpoint("example", "second") is None
    assert list(container_links(second)) == ["lo"]

    env.containerd.remove("example", "second")
    env.containerd.remove("example", "first")
    env.wait_detached("example", "first")
    assert_no_leaks(env, ["example--first", "example--second"], networks=("published",))
    dnat = [rule for rule in nat_rules() if f"--dport {HOST_PORT}" in rule]
    assert dnat == []


def _next_subnet() -> ipaddress.IPv4Network:
    # The /16 after the suite's subnet, so suites with their own subnets
    # never share it.
    return ipaddress.IPv4Network((int(SUBNET.network_address) + (1 << 16), 16))


def test_label_error_logged_once(fast_resync: WatcherEnv, daemon: Daemon) -> None:
    """A label error is logged at error level once, and a fixed conf dir attaches at a resync."""
    env = fast_resync
    env.containerd.start_container("example", "late", {"cni-watcher/networks": "latenet,lo"})

    first = daemon.wait_for_log("container.label_invalid", container_id="late", level="error")
    assert first["value"] == "latenet,lo"
    daemon.wait_for_log("container.label_invalid", container_id="late", level="debug", timeout=15)
    errors = [line for line in daemon.errors() if line["event"] == "container.label_invalid"]
    assert len(errors) == 1

    reference = json.loads((env.conf_dir / "10-mynet.conf").read_text())
    env.write_network("20-latenet.conf", {**reference, "name": "latenet"})
    checkpoint = env.wait_attached("example", "late")
    assert [network["name"] for network in checkpoint["networks"]] == ["latenet", "lo"]

    env.containerd.remove("example", "late")
    env.wait_detached("example", "late")
    assert_no_leaks(env, ["example--late"], networks=("latenet",))
