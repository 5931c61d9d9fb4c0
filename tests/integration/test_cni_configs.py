"""Operators' CNI configs through the daemon: spec versions, chains, ptp, several networks.

Each test writes its networks into the env's conf dir before the container
starts, starts a labelled busybox container, checks what the real plugins set
up, deletes the container and checks that nothing of it is left.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cni_fakes import read_records, write_fake_plugin
from tests.integration.cni_helpers import (
    EDITED_BRIDGE,
    EDITED_SUBNET,
    EXTRA_BRIDGES,
    PTP_SUBNET,
    SECOND_BRIDGE,
    SECOND_SUBNET,
    assert_clean,
    dnat_rules,
    host_routes,
    http_get,
    link_exists,
    portmap_shared_chains,
    remove_portmap_shared_chains,
    restart_with_bin_dirs,
    sysctl_in,
    write_raw_network,
)
from tests.integration.harness import (
    BRIDGE,
    CNI_BIN_DIR,
    REFERENCE_BRIDGE,
    REFERENCE_SUBNET,
    SUBNET,
    Daemon,
    WatcherEnv,
    bridge_veths,
    container_addresses,
    container_links,
    leases,
    nat_chain,
    nat_rules,
    run,
)

NAMESPACE = "example"
SERVE_HTTP = ("httpd", "-f", "-p", "80", "-h", "/www")


def bridge_plugin(**changes: Any) -> dict[str, Any]:
    """Return a bridge plugin on the suite's bridge and subnet, as in the reference config."""
    plugin: dict[str, Any] = {
        "type": "bridge",
        "bridge": REFERENCE_BRIDGE,
        "isGateway": True,
        "ipMasq": True,
        "ipam": {
            "type": "host-local",
            "subnet": REFERENCE_SUBNET,
            "routes": [{"dst": "0.0.0.0/0"}],
        },
    }
    plugin.update(changes)
    return plugin


PORTMAP = {"type": "portmap", "capabilities": {"portMappings": True}}
# A fake plugin that records its calls. It declares portMappings so that its
# stdin shows the runtimeConfig that portmap gets.
RECORDER = {"type": "cniw-recorder", "capabilities": {"portMappings": True}}
TUNING = {
    "type": "tuning",
    "sysctl": {"net.core.somaxconn": "1234", "net.ipv4.conf.IFNAME.rp_filter": "2"},
}


@pytest.fixture(autouse=True)
def remove_host_leftovers() -> Iterator[None]:
    """Delete the extra bridges, and portmap's shared chains if the test created them.

    Being autouse and without dependencies, this fixture ends after the
    daemon and the containers are gone.
    """
    had_portmap_chains = bool(portmap_shared_chains())
    yield
    for bridge in EXTRA_BRIDGES:
        run(["ip", "link", "delete", bridge], check=False)
    if not had_portmap_chains:
        remove_portmap_shared_chains()


def start(env: WatcherEnv, container_id: str, labels: dict[str, str], **kwargs: Any) -> int:
    """Start a labelled container, wait until it is attached and return its PID."""
    pid = env.containerd.start_container(NAMESPACE, container_id, labels, **kwargs)
    env.wait_attached(NAMESPACE, container_id)
    return pid


def delete(env: WatcherEnv, container_id: str) -> None:
    """Delete the container and wait until the daemon has detached it."""
    env.containerd.remove(NAMESPACE, container_id)
    env.wait_detached(NAMESPACE, container_id)


def single_address(pid: int, ifname: str = "eth0") -> ipaddress.IPv4Interface:
    """Return the single IPv4 address on ``ifname`` in the container."""
    addresses = container_addresses(pid, ifname)
    assert len(addresses) == 1, f"expected one address on {ifname}, got {addresses}"
    return ipaddress.IPv4Interface(addresses[0])


def test_chain_100_portmap_tuning(env: WatcherEnv, daemon: Daemon) -> None:
    """A 1.0.0 bridge, portmap and tuning chain publishes the port and sets the sysctls."""
    env.write_network(
        "20-web100.conflist",
        {"cniVersion": "1.0.0", "name": "web100", "plugins": [bridge_plugin(), PORTMAP, TUNING]},
    )
    labels = {"cni-watcher/networks": "web100,lo", "cni-watcher/ports": "18080:80/tcp"}
    pid = start(env, "web", labels, command=SERVE_HTTP)
    cni_id = f"{NAMESPACE}--web"

    address = single_address(pid)
    assert address.ip in SUBNET
    assert sysctl_in(pid, "net.core.somaxconn") == "1234"
    assert sysctl_in(pid, "net.ipv4.conf.eth0.rp_filter") == "2"
    [dnat] = dnat_rules(18080)
    assert f"--to-destination {address.ip}:80" in dnat
    assert dnat.startswith(f"-A {nat_chain('web100', cni_id, 'DN-')} ")
    assert any(cni_id in rule for rule in nat_rules() if rule.startswith("-A CNI-HOSTPORT-DNAT"))
    assert http_get(str(address.ip), 80).startswith(b"HTTP/1.")
    assert http_get("127.0.0.1", 18080).startswith(b"HTTP/1.")
    record = env.checkpoint(NAMESPACE, "web")
    assert record is not None
    assert record["networks"][0]["result"]["cniVersion"] == "1.0.0"
    assert record["networks"][0]["capability_args"]["portMappings"] == [
        {"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}
    ]

    delete(env, "web")

    assert_clean(env, [cni_id], ["web100"], ports=[18080])
    assert daemon.errors() == []


def test_chain_040_bridge_portmap(env: WatcherEnv, daemon: Daemon) -> None:
    """A 0.4.0 bridge and portmap chain attaches, publishes the port and detaches cleanly."""
    env.write_network(
        "20-web040.conflist",
        {"cniVersion": "0.4.0", "name": "web040", "plugins": [bridge_plugin(), PORTMAP]},
    )
    labels = {"cni-watcher/networks": "web040", "cni-watcher/ports": "18081:80"}
    pid = start(env, "web", labels, command=SERVE_HTTP)
    cni_id = f"{NAMESPACE}--web"

    address = single_address(pid)
    assert address.ip in SUBNET
    [dnat] = dnat_rules(18081)
    assert f"--to-destination {address.ip}:80" in dnat
    assert http_get("127.0.0.1", 18081).startswith(b"HTTP/1.")
    record = env.checkpoint(NAMESPACE, "web")
    assert record is not None
    result = record["networks"][0]["result"]
    assert result["cniVersion"] == "0.4.0"
    assert [ip["address"] for ip in result["ips"]] == [str(address)]

    delete(env, "web")

    assert_clean(env, [cni_id], ["web040"], ports=[18081])
    assert daemon.errors() == []


def test_ptp_own_subnet(env: WatcherEnv, daemon: Daemon) -> None:
    """A ptp network gets its own subnet and a host route, and both go on delete."""
    env.write_network(
        "30-ptp.conf",
        {
            "cniVersion": "1.0.0",
            "name": "ptpnet",
            "type": "ptp",
            "ipMasq": True,
            "ipam": {
                "type": "host-local",
                "subnet": str(PTP_SUBNET),
                "routes": [{"dst": "0.0.0.0/0"}],
            },
        },
    )
    pid = start(env, "p2p", {"cni-watcher/networks": "ptpnet,lo"}, command=SERVE_HTTP)
    cni_id = f"{NAMESPACE}--p2p"

    address = single_address(pid)
    assert address.ip in PTP_SUBNET
    assert len(host_routes(str(address.ip))) == 1
    assert http_get(str(address.ip), 80).startswith(b"HTTP/1.")
    assert any(cni_id in rule for rule in nat_rules())
    assert bridge_veths() == []

    delete(env, "p2p")

    assert host_routes(str(address.ip)) == []
    assert_clean(env, [cni_id], ["ptpnet"])
    assert daemon.errors() == []


def test_two_networks_eth0_eth1(env: WatcherEnv, daemon: Daemon) -> None:
    """Two bridge networks give eth0 and eth1 their own addresses, and delete removes both."""
    env.write_network(
        "40-second.conflist",
        {
            "cniVersion": "1.0.0",
            "name": "second",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": SECOND_BRIDGE,
                    "ipam": {"type": "host-local", "subnet": str(SECOND_SUBNET)},
                }
            ],
        },
    )
    pid = start(env, "multi", {"cni-watcher/networks": "mynet,second,lo"})
    cni_id = f"{NAMESPACE}--multi"

    assert single_address(pid, "eth0").ip in SUBNET
    assert single_address(pid, "eth1").ip in SECOND_SUBNET
    assert "UP" in container_links(pid)["lo"].split(",")
    assert len(bridge_veths(BRIDGE)) == 1
    assert len(bridge_veths(SECOND_BRIDGE)) == 1
    record = env.checkpoint(NAMESPACE, "multi")
    assert record is not None
    assert [net["ifname"] for net in record["networks"]] == ["eth0", "eth1", "lo"]

    delete(env, "multi")

    assert_clean(env, [cni_id], ["mynet", "second"], bridges=[BRIDGE, SECOND_BRIDGE])
    assert daemon.errors() == []


def test_static_ip_reference_config(env: WatcherEnv, daemon: Daemon) -> None:
    """The ip label on the 0.2.0 reference network gives eth0 exactly that address."""
    static = SUBNET[50]
    pid = start(env, "fixed", {"cni-watcher/networks": "mynet,lo", "cni-watcher/ip": str(static)})
    cni_id = f"{NAMESPACE}--fixed"

    assert container_addresses(pid) == [f"{static}/{SUBNET.prefixlen}"]
    assert list(leases(env)) == [str(static)]
    record = env.checkpoint(NAMESPACE, "fixed")
    assert record is not None
    assert record["networks"][0]["args"] == [["IgnoreUnknown", "1"], ["IP", str(static)]]

    delete(env, "fixed")

    assert_clean(env, [cni_id], ["mynet"])
    assert daemon.errors() == []


def test_static_ip_mac_capabilities(env: WatcherEnv, daemon: Daemon) -> None:
    """The ip and mac labels reach plugins that declare the ips and mac capabilities."""
    env.write_network(
        "20-caps.conflist",
        {
            "cniVersion": "1.0.0",
            "name": "caps",
            "plugins": [
                bridge_plugin(capabilities={"ips": True}),
                {"type": "tuning", "capabilities": {"mac": True}},
            ],
        },
    )
    static = SUBNET[60]
    mac = "02:42:0a:20:00:3c"
    labels = {"cni-watcher/networks": "caps", "cni-watcher/ip": str(static), "cni-watcher/mac": mac}
    pid = start(env, "caps", labels)
    cni_id = f"{NAMESPACE}--caps"

    assert container_addresses(pid) == [f"{static}/{SUBNET.prefixlen}"]
    link = run(["nsenter", "-t", str(pid), "-n", "ip", "-o", "link", "show", "eth0"]).stdout
    assert f"link/ether {mac} " in link
    record = env.checkpoint(NAMESPACE, "caps")
    assert record is not None
    assert record["networks"][0]["capability_args"] == {"ips": [str(static)], "mac": mac}
    assert record["networks"][0]["args"] == []

    delete(env, "caps")

    assert_clean(env, [cni_id], ["caps"])
    assert daemon.errors() == []


def edited_network(lease_dir: Path) -> dict[str, Any]:
    """Return the rewrite of editnet: another bridge, subnet, lease folder and marker."""
    return {
        "cniVersion": "1.0.0",
        "name": "editnet",
        "plugins": [
            bridge_plugin(
                bridge=EDITED_BRIDGE,
                ipMasq=False,
                ipam={
                    "type": "host-local",
                    "subnet": str(EDITED_SUBNET),
                    "dataDir": str(lease_dir),
                },
            ),
            PORTMAP,
            {**RECORDER, "marker": "edited"},
        ],
    }


@pytest.mark.parametrize("change", ["rewritten", "removed"])
def test_conf_change_after_attach(env: WatcherEnv, daemon: Daemon, change: str) -> None:
    """DEL uses the checkpoint's config and prevResult after the network's file changes or goes."""
    fake_bin = env.base / "fake-bin"
    calls = env.base / "recorder-calls.jsonl"
    write_fake_plugin(fake_bin, "cniw-recorder", calls, echo_prev_result=True)
    restart_with_bin_dirs(env, daemon, [CNI_BIN_DIR, fake_bin])
    env.write_network(
        "50-editnet.conflist",
        {
            "cniVersion": "1.0.0",
            "name": "editnet",
            "plugins": [bridge_plugin(), PORTMAP, {**RECORDER, "marker": "original"}],
        },
    )
    labels = {"cni-watcher/networks": "editnet", "cni-watcher/ports": "18082:80/tcp"}
    pid = start(env, "edited", labels)
    cni_id = f"{NAMESPACE}--edited"
    address = single_address(pid)
    assert len(dnat_rules(18082)) == 1
    record = env.checkpoint(NAMESPACE, "edited")
    assert record is not None
    stored_result = record["networks"][0]["result"]

    if change == "rewritten":
        write_raw_network(env, "50-editnet.conflist", edited_network(env.base / "edited-leases"))
    else:
        (env.conf_dir / "50-editnet.conflist").unlink()
    delete(env, "edited")

    [del_call] = [call for call in read_records(calls) if call["env"]["CNI_COMMAND"] == "DEL"]
    assert del_call["stdin"]["marker"] == "original"
    assert del_call["stdin"]["prevResult"] == stored_result
    assert [ip["address"] for ip in stored_result["ips"]] == [str(address)]
    assert del_call["stdin"]["runtimeConfig"]["portMappings"][0]["hostPort"] == 18082
    assert not link_exists(EDITED_BRIDGE)
    assert_clean(env, [cni_id], ["editnet"], ports=[18082])
    assert daemon.errors() == []


@pytest.mark.parametrize(
    ("network", "reason"),
    [
        (
            {
                "cniVersion": "1.0.0",
                "name": "broken",
                "plugins": [bridge_plugin(), {"type": "cniw-no-such-plugin"}],
            },
            "CNI plugin 'cniw-no-such-plugin' of network 'broken' not found in /usr/lib/cni",
        ),
        (
            {"cniVersion": "1.1.0", "name": "broken", "plugins": [bridge_plugin()]},
            "network 'broken' has cniVersion 1.1.0, but CNI plugin 'bridge' at "
            "/usr/lib/cni/bridge supports only 0.1.0, 0.2.0, 0.3.0, 0.3.1, 0.4.0, 1.0.0",
        ),
    ],
    ids=["missing-plugin", "unsupported-version"],
)
def test_unusable_network_attaches_nothing(
    env: WatcherEnv, daemon: Daemon, network: dict[str, Any], reason: str
) -> None:
    """A network the plugins cannot run logs one error line and leaves the container untouched."""
    env.write_network("60-broken.conflist", network)
    pid = env.containerd.start_container(NAMESPACE, "nonet", {"cni-watcher/networks": "broken,lo"})
    cni_id = f"{NAMESPACE}--nonet"
    line = daemon.wait_for_log("container.attach_failed", container_id="nonet")

    assert reason in line["error"]
    assert daemon.errors() == [line]
    assert list(container_links(pid)) == ["lo"]
    assert bridge_veths() == []
    assert leases(env, "broken") == {}

    delete(env, "nonet")

    assert_clean(env, [cni_id], ["broken"])
    assert daemon.errors() == [line]
