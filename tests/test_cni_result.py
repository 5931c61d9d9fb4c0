"""Tests for watcher.cni.result: parsing results of every version and converting them."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from watcher.cni.result import DNS, Interface, IPConfig, Result, Route
from watcher.cni.version import SUPPORTED_VERSIONS
from watcher.errors import InvalidResultError

RESULT_020 = {
    "cniVersion": "0.2.0",
    "ip4": {
        "ip": "10.22.0.5/16",
        "gateway": "10.22.0.1",
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "192.168.0.0/24", "gw": "10.22.0.254"}],
    },
    "ip6": {
        "ip": "fd00::5/64",
        "gateway": "fd00::1",
        "routes": [{"dst": "::/0"}],
    },
    "dns": {"nameservers": ["10.22.0.1"], "domain": "example.test", "search": ["a.test"]},
}

RESULT_040 = {
    "cniVersion": "0.4.0",
    "interfaces": [
        {"name": "cni0", "mac": "aa:bb:cc:dd:ee:00"},
        {"name": "eth0", "mac": "aa:bb:cc:dd:ee:01", "sandbox": "/var/run/netns/x"},
    ],
    "ips": [
        {"version": "4", "interface": 1, "address": "10.22.0.5/16", "gateway": "10.22.0.1"},
        {"version": "4", "interface": 1, "address": "10.23.0.5/16"},
        {"version": "6", "interface": 1, "address": "fd00::5/64", "gateway": "fd00::1"},
    ],
    "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0", "gw": "fd00::1"}],
    "dns": {"nameservers": ["10.22.0.1"]},
}

RESULT_100 = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:01", "sandbox": "/var/run/netns/x"}],
    "ips": [
        {"interface": 0, "address": "10.22.0.5/16", "gateway": "10.22.0.1"},
        {"interface": 0, "address": "fd00::5/64"},
    ],
    "routes": [{"dst": "0.0.0.0/0"}],
}


def test_parse_020_ip4_and_ip6() -> None:
    """A 0.2.0 result parses ip4, ip6, their routes and dns into the typed form."""
    result = Result.parse(RESULT_020, "0.2.0")

    assert result.cni_version == "0.2.0"
    assert result.interfaces == ()
    assert result.ips == (
        IPConfig(
            address=ipaddress.ip_interface("10.22.0.5/16"),
            gateway=ipaddress.ip_address("10.22.0.1"),
        ),
        IPConfig(
            address=ipaddress.ip_interface("fd00::5/64"),
            gateway=ipaddress.ip_address("fd00::1"),
        ),
    )
    assert result.routes == (
        Route(dst=ipaddress.ip_network("0.0.0.0/0")),
        Route(
            dst=ipaddress.ip_network("192.168.0.0/24"),
            gw=ipaddress.ip_address("10.22.0.254"),
        ),
        Route(dst=ipaddress.ip_network("::/0")),
    )
    assert result.dns == DNS(nameservers=("10.22.0.1",), domain="example.test", search=("a.test",))
    assert result.addresses() == ["10.22.0.5/16", "fd00::5/64"]


def test_parse_010_same_shape_as_020() -> None:
    """A 0.1.0 result has the 0.2.0 shape."""
    result = Result.parse({**RESULT_020, "cniVersion": "0.1.0"}, "0.1.0")

    assert result.cni_version == "0.1.0"
    assert result.addresses() == ["10.22.0.5/16", "fd00::5/64"]


def test_parse_040_interfaces_and_ips() -> None:
    """A 0.4.0 result parses interfaces, ips with interface index, routes and dns."""
    result = Result.parse(RESULT_040, "0.4.0")

    assert result.interfaces[1] == Interface(
        name="eth0", mac="aa:bb:cc:dd:ee:01", sandbox="/var/run/netns/x"
    )
    assert [ip.interface for ip in result.ips] == [1, 1, 1]
    assert [ip.version for ip in result.ips] == ["4", "4", "6"]
    assert result.ips[1].gateway is None
    assert result.routes[1].gw == ipaddress.ip_address("fd00::1")
    assert result.dns.nameservers == ("10.22.0.1",)
    assert result.addresses() == ["10.22.0.5/16", "10.23.0.5/16", "fd00::5/64"]


def test_parse_keeps_raw() -> None:
    """raw contains the input unchanged, including fields the typed form does not model."""
    data = {**RESULT_100, "cniVersion": "1.1.0"}
    data["routes"] = [{"dst": "0.0.0.0/0", "mtu": 1400}]

    result = Result.parse(data, "1.1.0")

    assert result.raw == data
    assert result.raw is not data


def test_parse_uses_own_version_first() -> None:
    """The result's cniVersion wins over the version the caller passes."""
    result = Result.parse(RESULT_040, "1.0.0")

    assert result.cni_version == "0.4.0"


def test_parse_missing_version_uses_argument() -> None:
    """A result without cniVersion is parsed as the version passed, and raw records it."""
    data = {key: value for key, value in RESULT_020.items() if key != "cniVersion"}

    result = Result.parse(data, "0.2.0")

    assert result.cni_version == "0.2.0"
    assert result.raw["cniVersion"] == "0.2.0"
    assert len(result.ips) == 2


def test_parse_empty_result() -> None:
    """A result with only cniVersion parses to empty fields."""
    result = Result.parse({"cniVersion": "1.0.0"}, "1.0.0")

    assert result.ips == ()
    assert result.dns.is_empty()
    assert result.addresses() == []


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"cniVersion": "2.0.0"}, "unsupported result cniVersion"),
        ({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.1"}]}, "ips[0].address"),
        ({"cniVersion": "1.0.0", "ips": [{"address": "nope/8"}]}, "ips[0].address"),
        ({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.1/8", "gateway": "x"}]}, "gateway"),
        ({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.1/8", "interface": -1}]}, "interface"),
        ({"cniVersion": "1.0.0", "ips": {"address": "10.0.0.1/8"}}, "ips is not a list"),
        ({"cniVersion": "1.0.0", "interfaces": [{"mac": "x"}]}, "interfaces[0].name"),
        ({"cniVersion": "1.0.0", "routes": [{"gw": "10.0.0.1"}]}, "routes[0].dst"),
        ({"cniVersion": "1.0.0", "dns": {"nameservers": "10.0.0.1"}}, "dns.nameservers"),
        ({"cniVersion": "0.2.0", "ip4": {"gateway": "10.0.0.1"}}, "ip4.ip"),
        ({"cniVersion": "0.2.0", "ip4": []}, "ip4 is not a JSON object"),
    ],
)
def test_parse_invalid_raises(data: dict[str, Any], field: str) -> None:
    """Each malformed result raises InvalidResultError naming the field."""
    with pytest.raises(InvalidResultError) as excinfo:
        Result.parse(data, "1.0.0")

    assert field in str(excinfo.value)


def test_convert_020_to_040() -> None:
    """0.2.0 to 0.4.0 gives ips with version, no interface index, and all routes at top level."""
    converted = Result.parse(RESULT_020, "0.2.0").convert("0.4.0")

    assert converted == {
        "cniVersion": "0.4.0",
        "ips": [
            {"version": "4", "address": "10.22.0.5/16", "gateway": "10.22.0.1"},
            {"version": "6", "address": "fd00::5/64", "gateway": "fd00::1"},
        ],
        "routes": [
            {"dst": "0.0.0.0/0"},
            {"dst": "192.168.0.0/24", "gw": "10.22.0.254"},
            {"dst": "::/0"},
        ],
        "dns": {"nameservers": ["10.22.0.1"], "domain": "example.test", "search": ["a.test"]},
    }


def test_convert_020_to_100_has_no_ip_version() -> None:
    """0.2.0 to 1.0.0 gives ips without version."""
    converted = Result.parse(RESULT_020, "0.2.0").convert("1.0.0")

    assert converted["cniVersion"] == "1.0.0"
    assert converted["ips"] == [
        {"address": "10.22.0.5/16", "gateway": "10.22.0.1"},
        {"address": "fd00::5/64", "gateway": "fd00::1"},
    ]


def test_convert_040_to_020_first_address_per_family() -> None:
    """0.4.0 to 0.2.0 keeps the first IPv4 and IPv6 address and sorts routes by family."""
    converted = Result.parse(RESULT_040, "0.4.0").convert("0.2.0")

    assert converted == {
        "cniVersion": "0.2.0",
        "ip4": {"ip": "10.22.0.5/16", "gateway": "10.22.0.1", "routes": [{"dst": "0.0.0.0/0"}]},
        "ip6": {
            "ip": "fd00::5/64",
            "gateway": "fd00::1",
            "routes": [{"dst": "::/0", "gw": "fd00::1"}],
        },
        "dns": {"nameservers": ["10.22.0.1"]},
    }


def test_convert_100_to_020_drops_routes_without_family() -> None:
    """Routes of a family with no address are dropped when converting to 0.2.0."""
    data = {
        "cniVersion": "1.0.0",
        "ips": [{"address": "10.22.0.5/16"}],
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
    }

    converted = Result.parse(data, "1.0.0").convert("0.2.0")

    assert converted == {
        "cniVersion": "0.2.0",
        "ip4": {"ip": "10.22.0.5/16", "routes": [{"dst": "0.0.0.0/0"}]},
        "dns": {},
    }


def test_convert_to_020_without_ips_raises() -> None:
    """A result without addresses cannot become 0.2.0, as in libcni."""
    result = Result.parse({"cniVersion": "1.0.0", "interfaces": [{"name": "lo"}]}, "1.0.0")

    with pytest.raises(InvalidResultError, match="no IP address"):
        result.convert("0.2.0")


def test_convert_100_to_031_adds_ip_version() -> None:
    """1.0.0 to 0.3.1 adds version to each ip from its address family."""
    converted = Result.parse(RESULT_100, "1.0.0").convert("0.3.1")

    assert converted == {
        "cniVersion": "0.3.1",
        "interfaces": RESULT_100["interfaces"],
        "ips": [
            {"version": "4", "interface": 0, "address": "10.22.0.5/16", "gateway": "10.22.0.1"},
            {"version": "6", "interface": 0, "address": "fd00::5/64"},
        ],
        "routes": [{"dst": "0.0.0.0/0"}],
    }


def test_convert_040_to_100_drops_ip_version() -> None:
    """0.4.0 to 1.0.0 removes version from ips and keeps everything else."""
    converted = Result.parse(RESULT_040, "0.4.0").convert("1.0.0")

    assert [ip.get("version") for ip in converted["ips"]] == [None, None, None]
    assert [ip["interface"] for ip in converted["ips"]] == [1, 1, 1]
    assert converted["interfaces"] == RESULT_040["interfaces"]
    assert converted["routes"] == RESULT_040["routes"]
    assert converted["dns"] == RESULT_040["dns"]


def test_convert_same_shape_copies_raw() -> None:
    """Within one shape only cniVersion changes, so unmodelled fields survive."""
    data = {**RESULT_100, "cniVersion": "1.1.0", "routes": [{"dst": "0.0.0.0/0", "mtu": 1400}]}
    result = Result.parse(data, "1.1.0")

    converted = result.convert("1.0.0")

    assert converted == {**data, "cniVersion": "1.0.0"}
    assert result.raw["cniVersion"] == "1.1.0"


def test_convert_040_to_030_and_back() -> None:
    """0.4.0 and 0.3.0 share a shape, so the result survives both ways."""
    there = Result.parse(RESULT_040, "0.4.0").convert("0.3.0")
    back = Result.parse(there, "0.3.0").convert("0.4.0")

    assert there == {**RESULT_040, "cniVersion": "0.3.0"}
    assert back == RESULT_040


@pytest.mark.parametrize("source", [RESULT_020, RESULT_040, RESULT_100])
@pytest.mark.parametrize("target", SUPPORTED_VERSIONS)
def test_convert_every_pair_parses_back(source: dict[str, Any], target: str) -> None:
    """Every conversion parses again as the target version with the same addresses."""
    result = Result.parse(source, "1.0.0")

    converted = Result.parse(result.convert(target), target)

    assert converted.cni_version == target
    expected = result.addresses()
    if target in ("0.1.0", "0.2.0"):
        # The 0.2.0 shape has room for one address of each family.
        first_v4 = [a for a in expected if ":" not in a][:1]
        first_v6 = [a for a in expected if ":" in a][:1]
        expected = first_v4 + first_v6
    assert converted.addresses() == expected


def test_convert_020_round_trip() -> None:
    """0.2.0 to 1.0.0 and back gives the original result."""
    there = Result.parse(RESULT_020, "0.2.0").convert("1.0.0")

    back = Result.parse(there, "1.0.0").convert("0.2.0")

    assert back == RESULT_020


def test_convert_unsupported_version_raises() -> None:
    """Converting to an unknown version raises InvalidResultError."""
    with pytest.raises(InvalidResultError, match="unsupported result cniVersion"):
        Result.parse(RESULT_100, "1.0.0").convert("0.5.0")


def test_result_equality_ignores_raw() -> None:
    """Results with equal typed fields are equal and hash alike even if raw differs."""
    first = Result.parse(RESULT_100, "1.0.0")
    second = Result.parse({**RESULT_100, "extra": 1}, "1.0.0")

    assert first == second
    assert hash(first) == hash(second)
