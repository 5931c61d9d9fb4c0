"""CNI results: typed, immutable forms of what a plugin prints after ADD.

The spec has three result shapes, and the conversions between them follow
libcni's ``pkg/types`` packages:

* 0.1.0 and 0.2.0: ``ip4`` and ``ip6``, each with ``ip``, ``gateway`` and
  ``routes``, plus ``dns``.
* 0.3.0, 0.3.1 and 0.4.0: ``interfaces``, ``ips`` (``address``, ``gateway``,
  ``interface`` index and ``version``), ``routes`` and ``dns``.
* 1.0.0 and 1.1.0: as 0.4.0, but ``ips`` have no ``version``.

Within one shape a conversion copies the raw result and only changes
``cniVersion``, so fields that the typed form does not model are kept.
Between shapes the result is rebuilt from the typed form, which drops such
fields, as libcni does.
"""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from watcher.cni.version import SUPPORTED_VERSIONS, is_supported
from watcher.errors import InvalidResultError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_SHAPE_BY_VERSION = {
    "0.1.0": "0.2",
    "0.2.0": "0.2",
    "0.3.0": "0.4",
    "0.3.1": "0.4",
    "0.4.0": "0.4",
    "1.0.0": "1.0",
    "1.1.0": "1.0",
}


@dataclass(frozen=True)
class Interface:
    """A network interface that a plugin created or configured."""

    name: str
    mac: str = ""
    sandbox: str = ""


@dataclass(frozen=True)
class IPConfig:
    """An address assigned to an interface.

    ``interface`` is an index into ``Result.interfaces``, or None when the
    plugin did not set it (always None for results of 0.2.0 and earlier).
    """

    address: IPInterface
    gateway: IPAddress | None = None
    interface: int | None = None

    @property
    def version(self) -> str:
        """The IP version as the 0.3.x and 0.4.0 results spell it: "4" or "6"."""
        return str(self.address.version)


@dataclass(frozen=True)
class Route:
    """A route to install in the container. ``gw`` None means the default gateway."""

    dst: IPNetwork
    gw: IPAddress | None = None


@dataclass(frozen=True)
class DNS:
    """Resolver settings that a plugin suggests for the container."""

    nameservers: tuple[str, ...] = ()
    domain: str = ""
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()

    def is_empty(self) -> bool:
        """Return whether no field is set."""
        return not (self.nameservers or self.domain or self.search or self.options)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form, with only the fields that are set."""
        data: dict[str, Any] = {}
        if self.nameservers:
            data["nameservers"] = list(self.nameservers)
        if self.domain:
            data["domain"] = self.domain
        if self.search:
            data["search"] = list(self.search)
        if self.options:
            data["options"] = list(self.options)
        return data


@dataclass(frozen=True)
class Result:
    """A plugin's ADD result in typed form, plus the JSON it was parsed from.

    ``raw`` is the result as the plugin printed it, with ``cniVersion`` set.
    The daemon stores it in checkpoints and passes it back as ``prevResult``.
    It takes no part in comparisons and hashing.
    """

    cni_version: str
    interfaces: tuple[Interface, ...] = ()
    ips: tuple[IPConfig, ...] = ()
    routes: tuple[Route, ...] = ()
    dns: DNS = DNS()
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def parse(cls, data: Mapping[str, Any], version: str) -> Result:
        """Parse a result of any supported version.

        The result's own ``cniVersion`` decides its shape. ``version`` is used
        only when the result has none, which older plugins allow. Raises
        InvalidResultError, naming the field, when the result is malformed or
        its version is not supported.
        """
        if not isinstance(data, Mapping):
            raise InvalidResultError(
                f"invalid result: expected a JSON object, got {type(data).__name__}"
            )
        result_version = data.get("cniVersion") or version
        _check_version(result_version)

        raw = copy.deepcopy(dict(data))
        raw["cniVersion"] = result_version
        if _SHAPE_BY_VERSION[result_version] == "0.2":
            return _parse_shape_02(raw, result_version)
        return _parse_shape_04(raw, result_version)

    def convert(self, version: str) -> dict[str, Any]:
        """Return the result in the JSON form of spec ``version``.

        Raises InvalidResultError when ``version`` is not supported, or when
        the target is 0.2.0 or earlier and the result has no IP address, which
        that shape cannot express.
        """
        _check_version(version)

        target_shape = _SHAPE_BY_VERSION[version]
        if target_shape == _SHAPE_BY_VERSION[self.cni_version]:
            converted = copy.deepcopy(self.raw)
            converted["cniVersion"] = version
            return converted
        if target_shape == "0.2":
            return self._to_shape_02(version)
        return self._to_shape_04(version, with_ip_version=target_shape == "0.4")

    def addresses(self) -> list[str]:
        """Return each IP address with its prefix length, such as "10.22.0.5/16"."""
        return [str(ip.address) for ip in self.ips]

    def _to_shape_02(self, version: str) -> dict[str, Any]:
        """Build the ip4/ip6 form from the first IPv4 and the first IPv6 address.

        Routes go with the address of their family, and are dropped when the
        result has no address of that family, as in libcni.
        """
        ip4 = next((ip for ip in self.ips if ip.address.version == 4), None)
        ip6 = next((ip for ip in self.ips if ip.address.version == 6), None)
        if ip4 is None and ip6 is None:
            raise InvalidResultError(
                f"cannot convert result from {self.cni_version} to {version}: "
                "it has no IP address, which a result of 0.2.0 or earlier requires"
            )

        data: dict[str, Any] = {"cniVersion": version}
        for key, ip in (("ip4", ip4), ("ip6", ip6)):
            if ip is None:
                continue
            routes = [route for route in self.routes if route.dst.version == ip.address.version]
            data[key] = _ip_config_02_to_dict(ip, routes)
        data["dns"] = self.dns.to_dict()
        return data

    def _to_shape_04(self, version: str, with_ip_version: bool) -> dict[str, Any]:
        data: dict[str, Any] = {"cniVersion": version}
        if self.interfaces:
            data["interfaces"] = [_interface_to_dict(interface) for interface in self.interfaces]
        if self.ips:
            data["ips"] = [_ip_config_to_dict(ip, with_ip_version) for ip in self.ips]
        if self.routes:
            data["routes"] = [_route_to_dict(route) for route in self.routes]
        if not self.dns.is_empty():
            data["dns"] = self.dns.to_dict()
        return data


def _check_version(version: Any) -> None:
    if not isinstance(version, str) or not is_supported(version):
        raise InvalidResultError(
            f"unsupported result cniVersion {version!r}: "
            f"supported versions are {', '.join(SUPPORTED_VERSIONS)}"
        )


def _parse_shape_02(raw: dict[str, Any], version: str) -> Result:
    """Parse the ip4/ip6 shape, moving each family's routes to the top level as libcni does."""
    ips: list[IPConfig] = []
    routes: list[Route] = []
    for key in ("ip4", "ip6"):
        section = raw.get(key)
        if section is None:
            continue
        section = _require_mapping(section, key)
        ips.append(
            IPConfig(
                address=_parse_interface_address(section.get("ip"), f"{key}.ip"),
                gateway=_parse_optional_address(section.get("gateway"), f"{key}.gateway"),
            )
        )
        routes.extend(_parse_routes(section.get("routes"), f"{key}.routes"))

    return Result(
        cni_version=version,
        ips=tuple(ips),
        routes=tuple(routes),
        dns=_parse_dns(raw.get("dns")),
        raw=raw,
    )


def _parse_shape_04(raw: dict[str, Any], version: str) -> Result:
    """Parse the interfaces/ips shape of 0.3.0 and later.

    The ``version`` field of 0.3.x and 0.4.0 ips is not stored because the
    address already shows it.
    """
    interfaces = tuple(
        _parse_interface(item, f"interfaces[{index}]")
        for index, item in enumerate(_require_list(raw.get("interfaces"), "interfaces"))
    )
    ips = tuple(
        _parse_ip_config(item, f"ips[{index}]")
        for index, item in enumerate(_require_list(raw.get("ips"), "ips"))
    )
    return Result(
        cni_version=version,
        interfaces=interfaces,
        ips=ips,
        routes=_parse_routes(raw.get("routes"), "routes"),
        dns=_parse_dns(raw.get("dns")),
        raw=raw,
    )


def _parse_interface(item: Any, where: str) -> Interface:
    item = _require_mapping(item, where)
    return Interface(
        name=_require_str(item.get("name"), f"{where}.name"),
        mac=_optional_str(item.get("mac"), f"{where}.mac"),
        sandbox=_optional_str(item.get("sandbox"), f"{where}.sandbox"),
    )


def _parse_ip_config(item: Any, where: str) -> IPConfig:
    item = _require_mapping(item, where)
    index = item.get("interface")
    if index is not None and (not isinstance(index, int) or isinstance(index, bool) or index < 0):
        raise InvalidResultError(
            f"invalid result: {where}.interface {index!r} is not an interface index"
        )
    return IPConfig(
        address=_parse_interface_address(item.get("address"), f"{where}.address"),
        gateway=_parse_optional_address(item.get("gateway"), f"{where}.gateway"),
        interface=index,
    )


def _parse_routes(items: Any, where: str) -> tuple[Route, ...]:
    routes = []
    for index, item in enumerate(_require_list(items, where)):
        item = _require_mapping(item, f"{where}[{index}]")
        routes.append(
            Route(
                dst=_parse_network(item.get("dst"), f"{where}[{index}].dst"),
                gw=_parse_optional_address(item.get("gw"), f"{where}[{index}].gw"),
            )
        )
    return tuple(routes)


def _parse_dns(item: Any) -> DNS:
    if item is None:
        return DNS()
    item = _require_mapping(item, "dns")
    return DNS(
        nameservers=_str_tuple(item.get("nameservers"), "dns.nameservers"),
        domain=_optional_str(item.get("domain"), "dns.domain"),
        search=_str_tuple(item.get("search"), "dns.search"),
        options=_str_tuple(item.get("options"), "dns.options"),
    )


def _parse_interface_address(value: Any, where: str) -> IPInterface:
    """Parse an address with prefix length, keeping its host bits ("10.22.0.5/16")."""
    text = _require_str(value, where)
    if "/" not in text:
        raise InvalidResultError(f"invalid result: {where} {text!r} has no prefix length")
    try:
        return ipaddress.ip_interface(text)
    except ValueError as err:
        raise InvalidResultError(f"invalid result: {where} {text!r}: {err}") from err


def _parse_network(value: Any, where: str) -> IPNetwork:
    """Parse a route destination. Host bits are cleared, as the kernel requires."""
    text = _require_str(value, where)
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as err:
        raise InvalidResultError(f"invalid result: {where} {text!r}: {err}") from err


def _parse_optional_address(value: Any, where: str) -> IPAddress | None:
    if value is None or value == "":
        return None
    text = _require_str(value, where)
    try:
        return ipaddress.ip_address(text)
    except ValueError as err:
        raise InvalidResultError(f"invalid result: {where} {text!r}: {err}") from err


def _require_mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidResultError(f"invalid result: {where} is not a JSON object")
    return value


def _require_list(value: Any, where: str) -> Sequence[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidResultError(f"invalid result: {where} is not a list")
    return value


def _require_str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidResultError(f"invalid result: {where} is missing or not a string")
    return value


def _optional_str(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidResultError(f"invalid result: {where} is not a string")
    return value


def _str_tuple(value: Any, where: str) -> tuple[str, ...]:
    items = _require_list(value, where)
    if not all(isinstance(item, str) for item in items):
        raise InvalidResultError(f"invalid result: {where} is not a list of strings")
    return tuple(items)


def _interface_to_dict(interface: Interface) -> dict[str, Any]:
    data: dict[str, Any] = {"name": interface.name}
    if interface.mac:
        data["mac"] = interface.mac
    if interface.sandbox:
        data["sandbox"] = interface.sandbox
    return data


def _ip_config_to_dict(ip: IPConfig, with_ip_version: bool) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if with_ip_version:
        data["version"] = ip.version
    if ip.interface is not None:
        data["interface"] = ip.interface
    data["address"] = str(ip.address)
    if ip.gateway is not None:
        data["gateway"] = str(ip.gateway)
    return data


def _ip_config_02_to_dict(ip: IPConfig, routes: Sequence[Route]) -> dict[str, Any]:
    data: dict[str, Any] = {"ip": str(ip.address)}
    if ip.gateway is not None:
        data["gateway"] = str(ip.gateway)
    if routes:
        data["routes"] = [_route_to_dict(route) for route in routes]
    return data


def _route_to_dict(route: Route) -> dict[str, Any]:
    data: dict[str, Any] = {"dst": str(route.dst)}
    if route.gw is not None:
        data["gw"] = str(route.gw)
    return data
