"""Helpers for the CNI config tests: extra networks, plugin folders and per-container leak checks.

The extra bridges and subnets stay inside 10.33.0.0/16 and 10.34.0.0/16 and
use bridge names that start with ``cniwb``, so this suite can run next to
another one that uses the reference names.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import shlex
import signal
import socket
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.integration.harness import (
    BRIDGE,
    Daemon,
    WatcherEnv,
    bridge_veths,
    leases,
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

# iptables limits chain names to 28 characters. The plugins name a
# container's chains "CNI-" plus an optional prefix plus the hex SHA-512 of
# network name and container ID, cut to that length (containernetworking/plugins
# pkg/utils, version 1.1.1).
MAX_CHAIN_LENGTH = 28


def container_chain(network: str, cni_id: str, prefix: str = "") -> str:
    """Return the name of a per-container chain: ``prefix`` "" for ipMasq, "DN-" for portmap."""
    digest = hashlib.sha512((network + cni_id).encode()).hexdigest()
    return f"CNI-{prefix}{digest}"[:MAX_CHAIN_LENGTH]


def write_raw_network(env: WatcherEnv, filename: str, network: dict[str, Any]) -> None:
    """Write a config file as given, without the bridge, subnet and dataDir changes."""
    (env.conf_dir / filename).write_text(json.dumps(network, indent=2))


def restart_with_bin_dirs(env: WatcherEnv, daemon: Daemon, bin_dirs: Sequence[Path]) -> None:
    """Set ``cni.bin_dirs`` in the daemon's config file and restart the daemon with it."""
    config = tomllib.loads(env.config_path.read_text())
    config["cni"]["bin_dirs"] = [str(folder) for folder in bin_dirs]
    env.config_path.write_text(_dump_toml(config))
    daemon.stop()
    daemon.start()


def _dump_toml(config: dict[str, Any]) -> str:
    # The daemon's config has only tables of strings, numbers, booleans and
    # lists of strings, and JSON writes each of those as valid TOML.
    lines: list[str] = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
    return "\n".join(lines) + "\n"


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
        container_chain(network, cni_id, prefix)
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


def stop_leftover_daemon(config_path: Path, timeout: float = 10.0) -> list[int]:
    """Stop any daemon still running with ``config_path`` and return the PIDs that were stopped.

    The daemon fixture leaves its process running when its wait for the
    detaches fails. Sends SIGTERM, then SIGKILL after ``timeout`` seconds.
    """
    pids = _daemon_pids(config_path)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _daemon_pids(config_path) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in _daemon_pids(config_path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def _daemon_pids(config_path: Path) -> list[int]:
    expected = ["-m", "watcher", "run", "--config", str(config_path)]
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if argv[1:-1] == expected:
            pids.append(int(entry.name))
    return pids
