"""Attach on task start and detach on task delete, on a real containerd with the real plugins."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest

from tests.integration.harness import (
    SUBNET,
    Daemon,
    WatcherEnv,
    assert_no_leaks,
    bridge_veths,
    container_addresses,
    container_links,
    leases,
    nat_rules,
    pins,
)

NETWORKS = {"cni-watcher/networks": "mynet,lo"}
HTTP_PORT = 8080
SERVE_HTTP = ("httpd", "-f", "-p", str(HTTP_PORT), "-h", "/www")


def test_labelled_container_gets_eth0_and_lo(env: WatcherEnv, daemon: Daemon) -> None:
    """A labelled container gets eth0 on the bridge and lo up, and serves TCP to the host."""
    pid = env.containerd.start_container("example", "web", NETWORKS, SERVE_HTTP)
    checkpoint = env.wait_attached("example", "web")

    addresses = container_addresses(pid, "eth0")
    assert len(addresses) == 1
    address = ipaddress.ip_interface(addresses[0])
    assert address.ip in SUBNET
    assert "UP" in container_links(pid)["lo"].split(",")
    assert [net["ifname"] for net in checkpoint["networks"]] == ["eth0", "lo"]
    assert checkpoint["cni_container_id"] == "example--web"

    with socket.create_connection((str(address.ip), HTTP_PORT), timeout=5) as connection:
        connection.sendall(b"GET / HTTP/1.0\r\n\r\n")
        reply = connection.recv(4096)
    assert reply.startswith(b"HTTP/1.")

    line = daemon.wait_for_log("network.attached", network="mynet")
    assert line["namespace"] == "example"
    assert line["container_id"] == "web"
    assert line["ifname"] == "eth0"
    assert line["ip"] == addresses[0]
    assert isinstance(line["duration_ms"], int)


def test_delete_leaves_nothing(env: WatcherEnv, daemon: Daemon) -> None:
    """Deleting a labelled container removes its lease, NAT rules, veth, pin and checkpoint."""
    env.containerd.start_container("example", "web", NETWORKS)
    env.wait_attached("example", "web")
    assert len(leases(env)) == 1
    assert any('id: \\"example--web\\"' in rule for rule in nat_rules())
    assert len(bridge_veths()) == 1
    assert len(pins(env)) == 1

    env.containerd.remove("example", "web")
    env.wait_detached("example", "web")

    assert_no_leaks(env, ["example--web"])
    detached = daemon.wait_for_log("network.detached", network="mynet")
    assert detached["container_id"] == "web"
    assert daemon.errors() == []


def test_unlabelled_container_untouched(env: WatcherEnv, daemon: Daemon) -> None:
    """A container without an opt-in label keeps a bare namespace and gets no checkpoint."""
    pid = env.containerd.start_container("example", "plain")
    daemon.wait_for_log("container.not_opted_in", container_id="plain")

    assert list(container_links(pid)) == ["lo"]
    assert env.checkpoint("example", "plain") is None
    assert pins(env) == []
    assert leases(env) == {}


def test_same_id_in_two_namespaces(env: WatcherEnv, daemon: Daemon) -> None:
    """The same container id in two containerd namespaces gets two separate attachments."""
    first = env.containerd.start_container("example", "app", NETWORKS)
    second = env.containerd.start_container("other", "app", NETWORKS)
    env.wait_attached("example", "app")
    env.wait_attached("other", "app")

    first_address = container_addresses(first)[0]
    second_address = container_addresses(second)[0]
    assert first_address != second_address
    owners = sorted(owner.split()[0] for owner in leases(env).values())
    assert owners == ["example--app", "other--app"]

    env.containerd.remove("example", "app")
    env.wait_detached("example", "app")
    assert container_addresses(second) == [second_address]
    assert list(leases(env).values())[0].startswith("other--app")

    env.containerd.remove("other", "app")
    env.wait_detached("other", "app")
    assert_no_leaks(env, ["example--app", "other--app"])


def test_invalid_label_rejected(env: WatcherEnv, daemon: Daemon) -> None:
    """A label naming an unknown network logs one error and leaves the container untouched."""
    pid = env.containerd.start_container("example", "typo", {"cni-watcher/networks": "nosuchnet"})
    line = daemon.wait_for_log("container.label_invalid", container_id="typo")

    assert line["label"] == "cni-watcher/networks"
    assert line["value"] == "nosuchnet"
    assert "nosuchnet" in line["reason"]
    assert list(container_links(pid)) == ["lo"]
    assert env.checkpoint("example", "typo") is None

    env.containerd.start_container("example", "fine", NETWORKS)
    env.wait_attached("example", "fine")


def test_exec_delete_ignored(env: WatcherEnv, daemon: Daemon) -> None:
    """The end of an exec process inside an attached container detaches nothing."""
    env.containerd.start_container("example", "web", NETWORKS)
    before = env.wait_attached("example", "web")

    env.containerd.ctr("tasks", "exec", "--exec-id", "probe", "web", "true", namespace="example")
    # Events are handled in order, so once a later container is attached the
    # exec's events have been handled too.
    env.containerd.start_container("example", "later", NETWORKS)
    env.wait_attached("example", "later")

    assert env.checkpoint("example", "web") == before


FAILING_PLUGIN = """#!/bin/sh
case "$CNI_COMMAND" in
VERSION) echo '{"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0"]}' ;;
ADD)
  echo '{"cniVersion": "1.0.0", "code": 7, "msg": "invalid config", "details": "no uplink"}'
  echo "uplink eth9 not found" >&2
  exit 1 ;;
esac
"""


@pytest.fixture
def broken(env: WatcherEnv, daemon: Daemon, tmp_path: Path) -> str:
    """A network ``broken`` whose plugin fails every ADD, with the daemon restarted to see it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "failing").write_text(FAILING_PLUGIN)
    (bin_dir / "failing").chmod(0o755)
    env.write_network(
        "30-broken.conf", {"cniVersion": "1.0.0", "name": "broken", "type": "failing"}
    )
    env.bin_dirs = (bin_dir, *env.bin_dirs)
    env.write_config()
    daemon.stop()
    daemon.start()
    return "broken"


def test_plugin_error_logged(env: WatcherEnv, daemon: Daemon, broken: str) -> None:
    """A plugin's CNI error is logged with code, msg and details, and the container is left bare."""
    pid = env.containerd.start_container("example", "web", {"cni-watcher/networks": broken})
    line = daemon.wait_for_log("container.attach_failed", container_id="web")

    assert line["plugin"] == "failing"
    assert line["command"] == "ADD"
    assert line["network"] == "broken"
    assert line["cni_code"] == 7
    assert line["cni_msg"] == "invalid config"
    assert line["cni_details"] == "no uplink"
    assert "uplink eth9 not found" in line["stderr"]
    assert line["transient"] is False
    assert list(container_links(pid)) == ["lo"]
    assert pins(env) == []
    checkpoint = env.checkpoint("example", "web")
    assert checkpoint is not None
    assert checkpoint["phase"] == "failed"

    env.containerd.remove("example", "web")
    env.wait_detached("example", "web")
    assert_no_leaks(env, ["example--web"], networks=("broken",))


def test_failed_second_network_undoes_first(env: WatcherEnv, daemon: Daemon, broken: str) -> None:
    """When the second network's ADD fails, the first network is removed again."""
    labels = {"cni-watcher/networks": f"mynet,{broken}"}
    pid = env.containerd.start_container("example", "web", labels)
    daemon.wait_for_log("container.attach_failed", container_id="web")

    assert daemon.wait_for_log("network.attached", container_id="web", network="mynet")
    assert list(container_links(pid)) == ["lo"]
    assert leases(env) == {}
    assert bridge_veths() == []
    assert [rule for rule in nat_rules() if "example--web" in rule] == []

    env.containerd.remove("example", "web")
    env.wait_detached("example", "web")
    assert_no_leaks(env, ["example--web"], networks=("mynet", "broken"))
