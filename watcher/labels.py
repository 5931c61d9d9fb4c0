"""Opt-in labels: parsing a container's labels into an attach request.

Only labels under the configured prefix are read. A container with neither
``PREFIX networks`` nor ``PREFIX enabled=true`` has not opted in and is never
touched. Every value is validated here, before anything on the host changes,
and a bad one raises LabelError naming the label, the value and the reason.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from watcher.errors import LabelError

# CNI's rule for network names (libcni validates the same pattern).
NETWORK_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*")
# Linux interface names are at most IFNAMSIZ - 1 = 15 bytes.
IFNAME_MAX_BYTES = 15
_MAC_RE = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")
_RATE_RE = re.compile(r"(\d+)([kmg]?)(?:bit)?", re.IGNORECASE)
_RATE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}
PROTOCOLS = ("tcp", "udp", "sctp")
# Label names after the prefix.
LABEL_NAMES = ("networks", "enabled", "ip", "mac", "ports", "bandwidth")

_T = TypeVar("_T")


@dataclass(frozen=True)
class NetworkRef:
    """One entry of the networks label: a network name and an optional interface name."""

    name: str
    ifname: str | None = None


@dataclass(frozen=True)
class PortMapping:
    """A published port, in the shape of the CNI ``portMappings`` capability."""

    host_port: int
    container_port: int
    protocol: str = "tcp"
    host_ip: str = ""

    def to_capability(self) -> dict[str, Any]:
        """Return the entry as the portmap plugin reads it from ``runtimeConfig``."""
        entry: dict[str, Any] = {
            "hostPort": self.host_port,
            "containerPort": self.container_port,
            "protocol": self.protocol,
        }
        if self.host_ip:
            entry["hostIP"] = self.host_ip
        return entry


@dataclass(frozen=True)
class Bandwidth:
    """Traffic limits in bits per second, with bursts in bits (CNI ``bandwidth`` capability)."""

    ingress_rate: int = 0
    ingress_burst: int = 0
    egress_rate: int = 0
    egress_burst: int = 0

    def to_capability(self) -> dict[str, int]:
        """Return the limits as the bandwidth plugin reads them from ``runtimeConfig``."""
        return {
            "ingressRate": self.ingress_rate,
            "ingressBurst": self.ingress_burst,
            "egressRate": self.egress_rate,
            "egressBurst": self.egress_burst,
        }


@dataclass(frozen=True)
class AttachRequest:
    """Networks and options that a container requests through its labels."""

    networks: tuple[NetworkRef, ...]
    ip: str | None = None
    mac: str | None = None
    ports: tuple[PortMapping, ...] = ()
    bandwidth: Bandwidth | None = None
    # The labels under the prefix as the container carries them, for messages.
    labels: Mapping[str, str] = field(default_factory=dict)


def parse_labels(
    labels: Mapping[str, str], prefix: str, default_networks: Sequence[str]
) -> AttachRequest | None:
    """Turn a container's labels into an AttachRequest, or None if it has not opted in.

    ``PREFIX enabled=false`` opts out even when a networks label is set.
    Raises LabelError for the first invalid label value, and for a label
    under the prefix that means nothing, which is most likely a misspelling.
    """
    networks_label = prefix + "networks"
    enabled_label = prefix + "enabled"
    enabled = _parse_enabled(enabled_label, labels.get(enabled_label))
    if enabled is False:
        return None
    if networks_label in labels:
        networks = parse_networks(networks_label, labels[networks_label])
    elif enabled:
        networks = _default_networks(enabled_label, default_networks)
    else:
        return None

    for label, value in labels.items():
        if label.startswith(prefix) and label[len(prefix) :] not in LABEL_NAMES:
            known = ", ".join(prefix + name for name in LABEL_NAMES)
            raise LabelError(label, value, f"unknown label; the known labels are {known}")

    return AttachRequest(
        networks=networks,
        ip=_optional(labels, prefix + "ip", parse_ip),
        mac=_optional(labels, prefix + "mac", parse_mac),
        ports=_optional(labels, prefix + "ports", parse_ports) or (),
        bandwidth=_optional(labels, prefix + "bandwidth", parse_bandwidth),
        labels={key: value for key, value in labels.items() if key.startswith(prefix)},
    )


def parse_networks(label: str, value: str) -> tuple[NetworkRef, ...]:
    """Parse ``name[:ifname],...``; raises LabelError."""
    refs: list[NetworkRef] = []
    for entry in value.split(","):
        name, _, ifname = entry.strip().partition(":")
        if not NETWORK_NAME_RE.fullmatch(name):
            reason = f"{name!r} is not a CNI network name (letters, digits, '_', '.', '-')"
            raise LabelError(label, value, reason)
        if ifname or entry.strip().endswith(":"):
            validate_ifname(label, value, ifname)
        if any(ref.name == name for ref in refs):
            raise LabelError(label, value, f"network {name!r} is listed twice")
        refs.append(NetworkRef(name=name, ifname=ifname or None))

    ifnames = [ref.ifname for ref in refs if ref.ifname]
    if len(ifnames) != len(set(ifnames)):
        raise LabelError(label, value, "two networks ask for the same interface name")
    return tuple(refs)


def validate_ifname(label: str, value: str, ifname: str) -> None:
    """Raise LabelError unless the kernel would accept ``ifname`` as an interface name."""
    if not ifname:
        reason = "the interface name after ':' is empty"
    elif len(ifname.encode()) > IFNAME_MAX_BYTES:
        reason = f"interface name {ifname!r} is longer than {IFNAME_MAX_BYTES} bytes"
    elif ifname in (".", "..") or any(char == "/" or char.isspace() for char in ifname):
        reason = f"interface name {ifname!r} contains '/' or whitespace or is '.' or '..'"
    else:
        return
    raise LabelError(label, value, reason)


def parse_ip(label: str, value: str) -> str:
    """Validate a static address, bare (``10.22.0.50``) or with a prefix length."""
    try:
        if "/" in value:
            ipaddress.ip_interface(value)
        else:
            ipaddress.ip_address(value)
    except ValueError:
        raise LabelError(label, value, "not an IPv4 or IPv6 address") from None
    return value


def parse_mac(label: str, value: str) -> str:
    """Validate a unicast MAC address written as six ':'-separated hex pairs."""
    if not _MAC_RE.fullmatch(value):
        raise LabelError(label, value, "not a MAC address such as 02:42:ac:11:00:02")
    if int(value[:2], 16) & 1:
        raise LabelError(label, value, "a multicast MAC address cannot be an interface address")
    return value.lower()


def parse_ports(label: str, value: str) -> tuple[PortMapping, ...]:
    """Parse ``[hostIP:]hostPort:containerPort[/protocol],...``; raises LabelError."""
    mappings = tuple(_parse_port(label, value, entry.strip()) for entry in value.split(","))
    seen = {(m.host_ip, m.host_port, m.protocol) for m in mappings}
    if len(seen) != len(mappings):
        raise LabelError(label, value, "the same host port and protocol are listed twice")
    return mappings


def parse_bandwidth(label: str, value: str) -> Bandwidth:
    """Parse ``ingress=RATE[:BURST],egress=RATE[:BURST]`` with rates like ``10M`` (bit/s)."""
    limits: dict[str, tuple[int, int]] = {}
    for entry in value.split(","):
        direction, _, spec = entry.strip().partition("=")
        if direction not in ("ingress", "egress") or direction in limits:
            raise LabelError(label, value, "expected ingress=RATE and/or egress=RATE, each once")
        rate_text, _, burst_text = spec.partition(":")
        rate = _parse_rate(label, value, rate_text)
        # Without a burst, allow one second's worth of traffic at the rate.
        burst = _parse_rate(label, value, burst_text) if burst_text else rate
        limits[direction] = (rate, burst)

    ingress = limits.get("ingress", (0, 0))
    egress = limits.get("egress", (0, 0))
    return Bandwidth(ingress[0], ingress[1], egress[0], egress[1])


def _parse_enabled(label: str, value: str | None) -> bool | None:
    if value is None:
        return None
    if value not in ("true", "false"):
        raise LabelError(label, value, "expected true or false")
    return value == "true"


def _default_networks(label: str, default_networks: Sequence[str]) -> tuple[NetworkRef, ...]:
    if not default_networks:
        reason = "cni.default_networks is empty in the config; set it or use the networks label"
        raise LabelError(label, "true", reason)
    return tuple(NetworkRef(name=name) for name in default_networks)


def _optional(labels: Mapping[str, str], label: str, parse: Callable[[str, str], _T]) -> _T | None:
    value = labels.get(label)
    return None if value is None else parse(label, value)


def _parse_port(label: str, value: str, entry: str) -> PortMapping:
    spec, _, protocol = entry.partition("/")
    protocol = protocol or "tcp"
    if protocol not in PROTOCOLS:
        reason = f"protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}"
        raise LabelError(label, value, reason)

    parts = spec.rsplit(":", 2)
    if len(parts) == 2:
        parts.insert(0, "")
    elif len(parts) != 3:
        parts = ["", spec, ""]
    host_ip, host_port, container_port = parts[0].strip("[]"), parts[1], parts[2]
    if host_ip:
        _check_host_ip(label, value, host_ip)
    return PortMapping(
        host_port=_parse_port_number(label, value, host_port),
        container_port=_parse_port_number(label, value, container_port),
        protocol=protocol,
        host_ip=host_ip,
    )


def _check_host_ip(label: str, value: str, host_ip: str) -> None:
    try:
        ipaddress.ip_address(host_ip)
    except ValueError:
        reason = f"host IP {host_ip!r} is not an IPv4 or IPv6 address"
        raise LabelError(label, value, reason) from None


def _parse_port_number(label: str, value: str, text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        reason = f"port {text!r} is not a number from 1 to 65535 (expected HOST:CONTAINER[/PROTO])"
        raise LabelError(label, value, reason)
    return int(text)


def _parse_rate(label: str, value: str, text: str) -> int:
    match = _RATE_RE.fullmatch(text)
    if match is None or int(match[1]) == 0:
        reason = f"rate {text!r} is not a positive number such as 10M or 500k"
        raise LabelError(label, value, reason)
    return int(match[1]) * _RATE_UNITS[match[2].lower()]
