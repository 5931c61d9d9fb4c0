"""Helpers for the CNI config tests: extra networks, plugin folders and per-container leak checks.

The extra bridges and subnets stay inside 10.33.0.0/16 and 10.34.0.0/16 and
use bridge names that start with ``cniwb``, so this suite can run next to
another one that uses the reference names.
"""

from __future__ import annotations

import ipaddress
import json
import shlex
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.integration.harness import (
    BRIDGE,
    Daemon,
    WatcherEnv,
    bridge_veths,
    leases,
    nat_chain,
    nat_rules,
    pins,
    run,
)

# Second bridge network, ptp network and the target of a config rewrite.
SECOND_BRIDGE = "cniwb1"
SECOND_SUBNET = ipaddress.ip_network("10.33.1.0/24")
PTP_SUBNET = ipaddress.ip_network("10.33.2.0/24")
EDITED_BRIDGE = "cniwb2"
EDITED_SUBNET = ipaddress.ip_network("10.34.0.0/24")
EXTRA_BRIDGES = (SECOND_BRIDGE, EDITED_BRIDGE)

# The nat chains that portmap creates once and shares between all containers.
# It never deletes them, so the tests do when they created them.
PORTMAP_SHARED_PREFIX = "CNI-HOSTPORT-"


def write_raw_network(env: WatcherEnv, filename: str, network: dict[str, Any]) -> None:
    """Write a config file as given, without the bridge, subnet and dataDir changes."""
    (env.conf_dir / filename).write_text(json.dumps(network, indent=2))


def restart_with_bin_dirs(env: WatcherEnv, daemon: Daemon, bin_dirs: Sequence[Path]) -> None:
    """Set ``cni.bin_dirs`` in the daemon's config file and restart the daemon with it."""
    env.bin_dirs = tuple(bin_dirs)
    env.write_config()
    daemon.stop()
    daemon.start()


def sysctl_in(pid: int, key: str) -> str:
    """Return the value of a sysctl in the network namespace of ``pid``."""
    return run(["nsenter", "-t", str(pid), "-n", "sysctl", "-n", key]).stdout.strip()


def http_get(host: str, port: int) -> bytes:
    """Send one HTTP/1.0 GET to ``host``:``port`` and return the start of the reply."""
    with socket.create_connection((host, port), timeout=5) as connection:
        connection.sendall(b"GET / HTTP/1.0\r\n\r\n")
        return connection.recv(4096)


def dnat_rules(port: int) -> list[str]:
    """Return the nat rules that DNAT TCP ``port`` to somewhere."""
    return [
        rule
        for rule in nat_rules()
        if rule.startswith("-A ") and f"--dport {port} " in rule and "-j DNAT" in rule
    ]


def host_routes(address: str) -> list[str]:
    """Return the host's routes to exactly ``address``."""
    return run(["ip", "-4", "route", "show", "exact", f"{address}/32"]).stdout.splitlines()


def link_exists(name: str) -> bool:
    """Return whether the host has a network interface called ``name``."""
    return run(["ip", "link", "show", name], check=False).returncode == 0


def assert_clean(
    env: WatcherEnv,
    cni_ids: Sequence[str],
    networks: Sequence[str],
    bridges: Sequence[str] = (BRIDGE,),
    ports: Sequence[int] = (),
) -> None:
    """Fail if anything of the given containers is left on the host or in the daemon's state.

    Looks for checkpoints, pins, host-local leases in ``networks``, nat rules
    that name a CNI container ID, the per-container ipMasq and portmap chains,
    DNAT rules for ``ports``, and veths on ``bridges``. Chains shared by all
    containers, such as CNI-HOSTPORT-DNAT, stay by design and are not checked.
    """
    assert env.checkpoints() == [], f"checkpoints left: {env.checkpoints()}"
    assert pins(env) == [], f"netns pins left: {pins(env)}"
    for network in networks:
        owned = {
            ip: owner
            for ip, owner in leases(env, network).items()
            if any(cni_id in owner for cni_id in cni_ids)
        }
        assert owned == {}, f"IPAM leases left in {network}: {owned}"

    rules = nat_rules()
    named = [rule for rule in rules if any(cni_id in rule for cni_id in cni_ids)]
    assert named == [], f"nat rules left: {named}"
    chains = {
        nat_chain(network, cni_id, prefix)
        for network in networks
        for cni_id in cni_ids
        for prefix in ("", "DN-")
    }
    left_chains = [rule for rule in rules if any(chain in rule for chain in chains)]
    assert left_chains == [], f"per-container nat chains left: {left_chains}"
    for port in ports:
        assert dnat_rules(port) == [], f"DNAT rules for port {port} left: {dnat_rules(port)}"
    for bridge in bridges:
        assert bridge_veths(bridge) == [], f"veths left on {bridge}: {bridge_veths(bridge)}"


def portmap_shared_chains() -> list[str]:
    """Return the names of portmap's shared nat chains that exist now."""
    return [
        line.split()[0][1:] for line in nat_rules() if line.startswith(":" + PORTMAP_SHARED_PREFIX)
    ]


def remove_portmap_shared_chains() -> None:
    """Delete portmap's shared nat chains and the jumps to them, unless a container uses them.

    A rule in CNI-HOSTPORT-DNAT means some container still has a published
    port, and then nothing is deleted.
    """
    rules = nat_rules()
    if any(rule.startswith(f"-A {PORTMAP_SHARED_PREFIX}DNAT ") for rule in rules):
        return
    for rule in rules:
        if rule.startswith("-A ") and f" -j {PORTMAP_SHARED_PREFIX}" in rule:
            run(["iptables", "-t", "nat", "-D", *shlex.split(rule)[1:]], check=False)
    for chain in portmap_shared_chains():
        run(["iptables", "-t", "nat", "-F", chain], check=False)
    for chain in portmap_shared_chains():
        run(["iptables", "-t", "nat", "-X", chain], check=False)
