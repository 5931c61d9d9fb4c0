"""Turning an attach request into the exact networks, interface names and args for ADD.

The plan is what goes into the ``attaching`` checkpoint, so DEL later runs
with the same configs and args even if the conf dir has changed since.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from watcher.checkpoints import Checkpoint, NetworkRecord
from watcher.cni import ConfDir, NetworkConfigList
from watcher.errors import LabelError
from watcher.labels import AttachRequest


def cni_container_id(namespace: str, container_id: str) -> str:
    """Return the CNI container ID for a container: ``NAMESPACE--ID``.

    containerd allows no two separators in a row in namespace names or
    container ids, so ``--`` never occurs inside either and the pair can be
    read back unambiguously from iptables comments and lease files.
    """
    return f"{namespace}--{container_id}"


def plan_networks(request: AttachRequest, conf: ConfDir, prefix: str) -> tuple[NetworkRecord, ...]:
    """Resolve each requested network in ``conf`` and choose its interface name and args.

    The first non-loopback network gets ``eth0``, the next ``eth1``, and
    loopback-type networks get ``lo``, unless the label names an interface.
    The static address and MAC address from the labels go to the first
    non-loopback network only, and ports and bandwidth to the first network
    whose plugins declare that capability, so a host port is never published
    twice. Raises LabelError for an unknown network, a clash of interface
    names, or ports or bandwidth that no plugin of the networks can apply.
    """
    networks_label = prefix + "networks"
    # Without a networks label the networks come from enabled=true and the
    # config's default_networks, so an unknown one is reported on that label.
    if networks_label in request.labels:
        source = (networks_label, request.labels[networks_label])
    else:
        source = (prefix + "enabled", "true")
    configs = [_find_network(conf, ref.name, *source) for ref in request.networks]
    ifnames = _choose_ifnames(request, configs)
    duplicates = sorted({name for name in ifnames if ifnames.count(name) > 1})
    if duplicates:
        value = request.labels.get(networks_label, ",".join(ref.name for ref in request.networks))
        reason = f"two networks would get the same interface name {duplicates[0]!r}"
        raise LabelError(networks_label, value, reason)

    ports_at = _first_declaring(request, configs, "portMappings", prefix + "ports")
    bandwidth_at = _first_declaring(request, configs, "bandwidth", prefix + "bandwidth")
    # The ip and mac labels are meant for the first non-loopback network, so
    # a loopback network listed first does not take them.
    static_at = next((i for i, net in enumerate(configs) if not net.is_loopback), 0)

    records = []
    for index, (net, ifname) in enumerate(zip(configs, ifnames, strict=True)):
        capability_args: dict[str, Any] = {}
        if index == ports_at:
            capability_args["portMappings"] = [port.to_capability() for port in request.ports]
        if index == bandwidth_at and request.bandwidth is not None:
            capability_args["bandwidth"] = request.bandwidth.to_capability()
        args: list[tuple[str, str]] = []
        if index == static_at:
            _static_address(request, net, capability_args, args)
        records.append(
            NetworkRecord(
                name=net.name,
                ifname=ifname,
                config=net.to_dict(),
                args=tuple(args),
                capability_args=capability_args,
            )
        )
    return tuple(records)


def find_port_conflict(
    records: tuple[NetworkRecord, ...], others: Iterable[Checkpoint]
) -> str | None:
    """Return why the planned host ports clash with another container's, or None.

    Two mappings clash when protocol and host port match and their host IPs
    are equal or either one is unset, which means every address.
    """
    requested = list(_published(records))
    for other in others:
        for published in _published(other.networks):
            for port in requested:
                if _same_host_port(port, published):
                    return (
                        f"host port {port['hostPort']}/{port['protocol']} is already published "
                        f"by container {other.namespace}/{other.container_id}"
                    )
    return None


def declares(net: NetworkConfigList, capability: str) -> bool:
    """Return whether a plugin of ``net`` declares ``capability`` in its ``capabilities`` map."""
    return any(bool(plugin.get("capabilities", {}).get(capability)) for plugin in net.plugins)


def _find_network(conf: ConfDir, name: str, label: str, value: str) -> NetworkConfigList:
    net = conf.networks.get(name)
    if net is None:
        known = ", ".join(sorted(conf.networks)) or "none"
        reason = f"no CNI network named {name!r} in the conf dir (known: {known})"
        raise LabelError(label, value, reason)
    return net


def _choose_ifnames(request: AttachRequest, configs: list[NetworkConfigList]) -> list[str]:
    ifnames: list[str] = []
    next_eth = 0
    for ref, net in zip(request.networks, configs, strict=True):
        if net.is_loopback:
            ifnames.append(ref.ifname or "lo")
            continue
        ifnames.append(ref.ifname or f"eth{next_eth}")
        next_eth += 1
    return ifnames


def _first_declaring(
    request: AttachRequest, configs: list[NetworkConfigList], capability: str, label: str
) -> int | None:
    """Return the index of the first network that can apply ``label``, or None without it."""
    value = request.labels.get(label)
    if value is None:
        return None
    for index, net in enumerate(configs):
        if declares(net, capability):
            return index
    reason = (
        f"no plugin in the container's networks declares the {capability!r} capability; "
        "add the plugin that provides it to the network's conflist"
    )
    raise LabelError(label, value, reason)


def _published(records: Iterable[NetworkRecord]) -> Iterator[Mapping[str, Any]]:
    for record in records:
        yield from record.capability_args.get("portMappings", ())


def _same_host_port(first: Mapping[str, Any], second: Mapping[str, Any]) -> bool:
    if (first["hostPort"], first["protocol"]) != (second["hostPort"], second["protocol"]):
        return False
    first_ip, second_ip = first.get("hostIP", ""), second.get("hostIP", "")
    return not first_ip or not second_ip or first_ip == second_ip


def _static_address(
    request: AttachRequest,
    net: NetworkConfigList,
    capability_args: dict[str, Any],
    args: list[tuple[str, str]],
) -> None:
    # Plugins that declare the ips/mac capabilities read them from
    # runtimeConfig; the rest (host-local among them) read IP= and MAC= from
    # CNI_ARGS, and IgnoreUnknown=1 keeps plugins that know neither from failing.
    fallback: list[tuple[str, str]] = []
    if request.ip and declares(net, "ips"):
        capability_args["ips"] = [request.ip]
    elif request.ip:
        fallback.append(("IP", request.ip.split("/")[0]))
    if request.mac and declares(net, "mac"):
        capability_args["mac"] = request.mac
    elif request.mac:
        fallback.append(("MAC", request.mac))
    if fallback:
        args.extend([("IgnoreUnknown", "1"), *fallback])
