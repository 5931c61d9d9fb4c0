"""Tests for parsing and validating opt-in labels."""

from __future__ import annotations

import pytest

from watcher.errors import LabelError
from watcher.labels import (
    AttachRequest,
    Bandwidth,
    NetworkRef,
    PortMapping,
    parse_labels,
)

PREFIX = "cni-watcher/"


def parse(labels: dict[str, str], defaults: tuple[str, ...] = ()) -> AttachRequest | None:
    return parse_labels(labels, PREFIX, defaults)


def test_no_opt_in_label_is_none() -> None:
    """A container without networks or enabled=true has not opted in."""
    assert parse({}) is None
    assert parse({"other/networks": "mynet", "cni-watcher/ip": "10.22.0.9"}) is None
    assert parse({"cni-watcher/enabled": "false"}) is None


def test_enabled_false_opts_out() -> None:
    """enabled=false keeps a container out even when it lists networks."""
    labels = {"cni-watcher/networks": "mynet", "cni-watcher/enabled": "false"}

    assert parse(labels) is None


def test_unknown_label_rejected() -> None:
    """A misspelt label under the prefix is rejected and the known labels listed."""
    labels = {"cni-watcher/networks": "mynet", "cni-watcher/port": "8080:80"}

    with pytest.raises(LabelError) as raised:
        parse(labels)

    assert raised.value.label == "cni-watcher/port"
    assert raised.value.value == "8080:80"
    assert "cni-watcher/ports" in raised.value.reason


def test_networks_in_label_order() -> None:
    """The networks label lists networks in order, with optional interface names."""
    request = parse({"cni-watcher/networks": "mynet, lo,second:net1"})

    assert request is not None
    assert request.networks == (
        NetworkRef("mynet"),
        NetworkRef("lo"),
        NetworkRef("second", "net1"),
    )


def test_enabled_uses_default_networks() -> None:
    """enabled=true attaches the networks configured as defaults."""
    request = parse({"cni-watcher/enabled": "true"}, defaults=("mynet", "lo"))

    assert request is not None
    assert request.networks == (NetworkRef("mynet"), NetworkRef("lo"))


def test_networks_label_wins_over_enabled() -> None:
    """An explicit networks label is used even when enabled=true is also set."""
    request = parse(
        {"cni-watcher/networks": "other", "cni-watcher/enabled": "true"}, defaults=("mynet",)
    )

    assert request is not None
    assert request.networks == (NetworkRef("other"),)


def test_optional_labels_parsed() -> None:
    """ip, mac, ports and bandwidth become typed values."""
    request = parse(
        {
            "cni-watcher/networks": "mynet",
            "cni-watcher/ip": "10.22.0.50",
            "cni-watcher/mac": "02:42:AC:11:00:02",
            "cni-watcher/ports": "8080:80/tcp, 127.0.0.1:5353:53/udp,[::1]:9000:9000",
            "cni-watcher/bandwidth": "ingress=10M,egress=500k:1M",
        }
    )

    assert request is not None
    assert request.ip == "10.22.0.50"
    assert request.mac == "02:42:ac:11:00:02"
    assert request.ports == (
        PortMapping(8080, 80, "tcp"),
        PortMapping(5353, 53, "udp", "127.0.0.1"),
        PortMapping(9000, 9000, "tcp", "::1"),
    )
    assert request.bandwidth == Bandwidth(10_000_000, 10_000_000, 500_000, 1_000_000)


def test_port_mapping_capability_shape() -> None:
    """A port mapping renders as the portmap plugin's runtimeConfig entry."""
    assert PortMapping(5353, 53, "udp", "127.0.0.1").to_capability() == {
        "hostPort": 5353,
        "containerPort": 53,
        "protocol": "udp",
        "hostIP": "127.0.0.1",
    }


@pytest.mark.parametrize(
    ("label", "value", "reason"),
    [
        ("networks", "", "not a CNI network name"),
        ("networks", "mynet,,lo", "not a CNI network name"),
        ("networks", "../etc", "not a CNI network name"),
        ("networks", "my net", "not a CNI network name"),
        ("networks", "mynet,mynet", "listed twice"),
        ("networks", "mynet:", "is empty"),
        ("networks", "mynet:averyveryverylongname", "longer than 15 bytes"),
        ("networks", "mynet:a/b", "contains '/'"),
        ("networks", "mynet:..", "'.' or '..'"),
        ("networks", "a:eth1,b:eth1", "same interface name"),
        ("enabled", "yes", "expected true or false"),
        ("ip", "10.22.0.300", "not an IPv4 or IPv6 address"),
        ("ip", "/etc/passwd", "not an IPv4 or IPv6 address"),
        ("mac", "02:42:ac:11:00", "not a MAC address"),
        ("mac", "01:00:5e:00:00:01", "multicast"),
        ("ports", "8080", "HOST:CONTAINER"),
        ("ports", "0:80", "from 1 to 65535"),
        ("ports", "8080:70000", "from 1 to 65535"),
        ("ports", "8080:80/icmp", "protocol 'icmp'"),
        ("ports", "bogus:8080:80", "not an IPv4 or IPv6 address"),
        ("ports", "8080:80,8080:81", "listed twice"),
        ("bandwidth", "ingress=fast", "not a positive number"),
        ("bandwidth", "sideways=10M", "expected ingress=RATE"),
        ("bandwidth", "ingress=0", "not a positive number"),
    ],
)
def test_invalid_label_rejected(label: str, value: str, reason: str) -> None:
    """Each invalid value raises LabelError naming the label, the value and the reason."""
    labels = {"cni-watcher/networks": "mynet", PREFIX + label: value}

    with pytest.raises(LabelError) as raised:
        parse(labels, defaults=("mynet",))

    assert raised.value.label == PREFIX + label
    assert raised.value.value == value
    assert reason in raised.value.reason


def test_enabled_without_defaults_rejected() -> None:
    """enabled=true with no default networks configured names the config key to set."""
    with pytest.raises(LabelError, match="cni.default_networks"):
        parse({"cni-watcher/enabled": "true"})


def test_custom_prefix() -> None:
    """Labels are read under the configured prefix only."""
    labels = {"net.example.com/networks": "mynet", "cni-watcher/networks": "other"}

    request = parse_labels(labels, "net.example.com/", ())

    assert request is not None
    assert request.networks == (NetworkRef("mynet"),)
