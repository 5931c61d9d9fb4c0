"""Checking that an attached container still has what ADD gave it.

For networks whose spec version has CHECK (0.4.0 and later) the plugins are
asked with CNI CHECK, unless the list sets ``disableCheck``. Older versions
have no CHECK, so the daemon looks into the pinned namespace itself: every
interface named in the checkpoint must exist and carry the addresses that ADD
reported for it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from typing import Any

from watcher.checkpoints import Checkpoint, NetworkRecord
from watcher.cni import CNIRuntime, NetworkConfigList, Result, RuntimeConf
from watcher.cni.version import at_least
from watcher.errors import CNIError, NetnsError

CHECK_MIN_VERSION = "0.4.0"
# Deadline for one `ip` run inside the pinned namespace.
INSPECT_TIMEOUT = 10.0


async def find_problem(cni: CNIRuntime, checkpoint: Checkpoint) -> str | None:
    """Return what is wrong with an attached container's networks, or None if nothing is.

    Raises NetnsError when the namespace cannot be inspected at all.
    """
    for record in checkpoint.networks:
        problem = await _check_network(cni, checkpoint, record)
        if problem is not None:
            return f"network {record.name!r} on {record.ifname}: {problem}"
    return None


async def _check_network(
    cni: CNIRuntime, checkpoint: Checkpoint, record: NetworkRecord
) -> str | None:
    net = NetworkConfigList.from_dict(record.config, source=f"checkpoint of network {record.name}")
    if at_least(net.cni_version, CHECK_MIN_VERSION):
        if net.disable_check or record.result is None:
            return None
        runtime = RuntimeConf(
            container_id=checkpoint.cni_container_id,
            netns=checkpoint.netns,
            ifname=record.ifname,
            args=record.args,
            capability_args=record.capability_args,
        )
        try:
            await cni.check_network(net, runtime, record.result)
        except CNIError as exc:
            return f"CNI CHECK failed: {exc}"
        return None
    return await _inspect_interface(checkpoint.netns, record, net.cni_version)


async def _inspect_interface(netns: str, record: NetworkRecord, version: str) -> str | None:
    link = await _read_link(netns, record.ifname)
    if link is None:
        return "the interface is missing"
    if "UP" not in link.get("flags", []):
        return "the interface is down"

    present = {
        ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}")
        for info in link.get("addr_info", [])
    }
    expected = _expected_addresses(record, version)
    missing = sorted(str(address) for address in expected - present)
    if missing:
        return f"address {', '.join(missing)} is missing"
    return None


def _expected_addresses(
    record: NetworkRecord, version: str
) -> set[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    if record.result is None:
        return set()
    result = Result.parse(record.result, version)
    names = [interface.name for interface in result.interfaces]
    expected = set()
    for ip in result.ips:
        # 0.2.0 results carry no interface index; their addresses belong to
        # the interface ADD was called for.
        if ip.interface is None or names[ip.interface : ip.interface + 1] == [record.ifname]:
            expected.add(ip.address)
    return expected


async def restore_for_del(checkpoint: Checkpoint) -> list[str]:
    """Recreate interfaces missing from the pinned namespace, with the addresses ADD reported.

    The bridge and ptp plugins find the NAT rules to remove through the
    addresses on the interface, so DEL of a removed interface would leave
    them. Each stand-in is a veth with its peer in the same namespace; DEL
    deletes it. Returns the names of the recreated interfaces. Raises
    NetnsError when ``ip`` fails.
    """
    restored = []
    for index, record in enumerate(checkpoint.networks):
        version = str(record.config.get("cniVersion", ""))
        addresses = _expected_addresses(record, version)
        if not addresses or await _read_link(checkpoint.netns, record.ifname) is not None:
            continue
        peer = f"cniw-del{index}"
        await _run_ip(
            checkpoint.netns, "link", "add", record.ifname, "type", "veth", "peer", "name", peer
        )
        for address in sorted(addresses, key=str):
            await _run_ip(checkpoint.netns, "addr", "add", str(address), "dev", record.ifname)
        restored.append(record.ifname)
    return restored


async def _read_link(netns: str, ifname: str) -> dict[str, Any] | None:
    try:
        stdout = await _run_ip(netns, "-j", "addr", "show", "dev", ifname)
    except _LinkMissing:
        return None
    links: list[dict[str, Any]] = json.loads(stdout or b"[]")
    return links[0] if links else None


class _LinkMissing(Exception):
    """Raised inside this module when ``ip`` reports that a device does not exist."""


async def _run_ip(netns: str, *args: str) -> bytes:
    process = await asyncio.create_subprocess_exec(
        "nsenter", f"--net={netns}", "ip", *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(INSPECT_TIMEOUT):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise NetnsError(f"ip {' '.join(args)} in {netns} timed out") from None

    if process.returncode != 0:
        if b"does not exist" in stderr:
            raise _LinkMissing()
        raise NetnsError(f"ip {' '.join(args)} in {netns} failed: {stderr.decode().strip()}")
    return stdout
