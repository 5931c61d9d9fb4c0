"""Tests for turning an attach request into networks, interface names and args."""

from __future__ import annotations

from pathlib import Path

import pytest

from watcher.checkpoints import Checkpoint, Phase
from watcher.cni import ConfDir, NetworkConfigList, load_conf_dir
from watcher.errors import LabelError
from watcher.labels import AttachRequest, Bandwidth, NetworkRef, PortMapping
from watcher.plan import cni_container_id, find_port_conflict, plan_networks

REPO = Path(__file__).resolve().parents[1]
PREFIX = "cni-watcher/"

PORTMAP_LIST = NetworkConfigList.from_dict(
    {
        "cniVersion": "1.0.0",
        "name": "published",
        "plugins": [
            {"type": "bridge", "bridge": "cni1", "ipam": {"type": "host-local"}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    },
    source="test",
)
STATIC_LIST = NetworkConfigList.from_dict(
    {
        "cniVersion": "1.0.0",
        "name": "static",
        "plugins": [
            {
                "type": "macvlan",
                "master": "eth0",
                "capabilities": {"ips": True, "mac": True},
                "ipam": {"type": "static"},
            }
        ],
    },
    source="test",
)


@pytest.fixture
def conf() -> ConfDir:
    reference = load_conf_dir(REPO / "config" / "net.d")
    networks = {**reference.networks, "published": PORTMAP_LIST, "static": STATIC_LIST}
    return ConfDir(networks=networks, problems=())


def request(*names: str, **fields: object) -> AttachRequest:
    refs = []
    for name in names:
        network, _, ifname = name.partition(":")
        refs.append(NetworkRef(network, ifname or None))
    return AttachRequest(networks=tuple(refs), **fields)  # type: ignore[arg-type]


def test_cni_container_id_form() -> None:
    """The CNI container ID joins namespace and id with a double hyphen."""
    assert cni_container_id("example", "web") == "example--web"


def test_reference_networks_get_eth0_and_lo(conf: ConfDir) -> None:
    """The bridge network gets eth0 and the loopback network gets lo."""
    records = plan_networks(request("mynet", "lo"), conf, PREFIX)

    assert [(r.name, r.ifname) for r in records] == [("mynet", "eth0"), ("lo", "lo")]
    assert records[0].config == conf.networks["mynet"].to_dict()
    assert records[0].args == ()
    assert records[0].capability_args == {}


def test_second_network_gets_eth1(conf: ConfDir) -> None:
    """Non-loopback networks are numbered eth0, eth1 in label order, loopback aside."""
    records = plan_networks(request("lo", "mynet", "published"), conf, PREFIX)

    assert [r.ifname for r in records] == ["lo", "eth0", "eth1"]


def test_explicit_ifname_kept(conf: ConfDir) -> None:
    """An interface name from the label replaces the automatic one."""
    records = plan_networks(request("mynet:net0", "published"), conf, PREFIX)

    assert [r.ifname for r in records] == ["net0", "eth1"]


def test_ifname_clash_rejected(conf: ConfDir) -> None:
    """An explicit name equal to an automatic one is rejected."""
    with pytest.raises(LabelError, match="same interface name"):
        plan_networks(request("mynet", "published:eth0"), conf, PREFIX)


def test_unknown_network_rejected(conf: ConfDir) -> None:
    """A network that is not in the conf dir is rejected with the whole label and known names."""
    labels = {"cni-watcher/networks": "mynet,nosuch"}
    with pytest.raises(LabelError) as raised:
        plan_networks(request("mynet", "nosuch", labels=labels), conf, PREFIX)

    assert raised.value.label == "cni-watcher/networks"
    assert raised.value.value == "mynet,nosuch"
    assert "'nosuch'" in raised.value.reason
    assert "known: lo, mynet, published, static" in raised.value.reason


def test_unknown_default_network_rejected(conf: ConfDir) -> None:
    """An unknown network from default_networks is reported on the enabled label."""
    labels = {"cni-watcher/enabled": "true"}
    with pytest.raises(LabelError) as raised:
        plan_networks(request("nosuch", labels=labels), conf, PREFIX)

    assert raised.value.label == "cni-watcher/enabled"
    assert raised.value.value == "true"


def test_static_ip_through_cni_args(conf: ConfDir) -> None:
    """For plugins without the ips capability the address goes into CNI_ARGS as IP=."""
    records = plan_networks(
        request("mynet", "lo", ip="10.22.0.50", mac="02:00:00:00:00:01"), conf, PREFIX
    )

    assert records[0].args == (
        ("IgnoreUnknown", "1"),
        ("IP", "10.22.0.50"),
        ("MAC", "02:00:00:00:00:01"),
    )
    assert records[1].args == ()


def test_static_ip_skips_loopback_first(conf: ConfDir) -> None:
    """The address goes to the first non-loopback network when lo is listed first."""
    records = plan_networks(request("lo", "mynet", ip="10.22.0.50"), conf, PREFIX)

    assert records[0].args == ()
    assert records[1].args == (("IgnoreUnknown", "1"), ("IP", "10.22.0.50"))


def test_static_ip_through_capability(conf: ConfDir) -> None:
    """For plugins that declare ips and mac, both go into runtimeConfig."""
    records = plan_networks(
        request("static", ip="192.168.50.9/24", mac="02:00:00:00:00:01"), conf, PREFIX
    )

    assert records[0].capability_args == {"ips": ["192.168.50.9/24"], "mac": "02:00:00:00:00:01"}
    assert records[0].args == ()


def test_ports_need_portmap(conf: ConfDir) -> None:
    """Ports are passed as portMappings, and rejected when no plugin can apply them."""
    ports = (PortMapping(8080, 80),)
    labels = {"cni-watcher/ports": "8080:80"}
    records = plan_networks(request("published", ports=ports, labels=labels), conf, PREFIX)
    assert records[0].capability_args["portMappings"] == [
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}
    ]

    rejected = request("mynet", ports=ports, labels=labels)
    with pytest.raises(LabelError, match="portMappings"):
        plan_networks(rejected, conf, PREFIX)


def test_bandwidth_needs_plugin(conf: ConfDir) -> None:
    """A bandwidth label with no bandwidth plugin in the networks is rejected."""
    limited = request(
        "mynet",
        bandwidth=Bandwidth(1000, 1000),
        labels={"cni-watcher/bandwidth": "ingress=1k"},
    )
    with pytest.raises(LabelError) as raised:
        plan_networks(limited, conf, PREFIX)

    assert raised.value.label == "cni-watcher/bandwidth"
    assert raised.value.value == "ingress=1k"


def test_ports_go_to_one_network(conf: ConfDir) -> None:
    """With two networks that contain portmap, only the first publishes the ports."""
    second = NetworkConfigList.from_dict({**PORTMAP_LIST.to_dict(), "name": "again"}, "test")
    both = ConfDir(networks={**conf.networks, "again": second}, problems=())
    ports = (PortMapping(8080, 80),)
    labels = {"cni-watcher/ports": "8080:80"}

    records = plan_networks(request("published", "again", ports=ports, labels=labels), both, PREFIX)

    assert "portMappings" in records[0].capability_args
    assert "portMappings" not in records[1].capability_args


@pytest.mark.parametrize(
    ("taken", "wanted", "clash"),
    [
        (PortMapping(8080, 80), PortMapping(8080, 81), True),
        (PortMapping(8080, 80), PortMapping(8080, 80, "udp"), False),
        (PortMapping(8080, 80), PortMapping(8081, 80), False),
        (PortMapping(8080, 80, host_ip="127.0.0.1"), PortMapping(8080, 80), True),
        (
            PortMapping(8080, 80, host_ip="127.0.0.1"),
            PortMapping(8080, 80, host_ip="127.0.0.2"),
            False,
        ),
    ],
)
def test_port_conflict_detected(
    conf: ConfDir, taken: PortMapping, wanted: PortMapping, clash: bool
) -> None:
    """Same port and protocol on overlapping host IPs clash; anything else does not."""
    labels = {"cni-watcher/ports": "..."}
    other = plan_networks(request("published", ports=(taken,), labels=labels), conf, PREFIX)
    mine = plan_networks(request("published", ports=(wanted,), labels=labels), conf, PREFIX)
    holder = Checkpoint(
        namespace="example",
        container_id="web",
        cni_container_id="example--web",
        pid=1,
        netns="",
        phase=Phase.ATTACHED,
        networks=other,
    )

    reason = find_port_conflict(mine, [holder])

    if clash:
        assert reason == (
            f"host port {wanted.host_port}/{wanted.protocol} is already published "
            "by container example/web"
        )
    else:
        assert reason is None
