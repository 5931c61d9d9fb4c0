"""Tests for watcher.cni.runtime: plugin lists with fake plugins, and one run of the real ones."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cni_fakes import read_records, write_fake_plugin
from watcher.cni.conf import NetworkConfigList
from watcher.cni.runtime import CNIRuntime, RuntimeConf
from watcher.errors import (
    CNIError,
    ConfigError,
    PluginError,
    PluginNotFoundError,
    PluginVersionError,
)

RESULT_100 = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
    "ips": [{"interface": 0, "address": "10.98.0.2/24", "gateway": "10.98.0.1"}],
    "routes": [{"dst": "0.0.0.0/0"}],
}

RESULT_020 = {
    "cniVersion": "0.2.0",
    "ip4": {"ip": "10.98.0.2/24", "gateway": "10.98.0.1", "routes": [{"dst": "0.0.0.0/0"}]},
}

CAPABILITY_ARGS = {
    "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}],
    "bandwidth": {"ingressRate": 1000, "ingressBurst": 100},
    "mac": "aa:bb:cc:dd:ee:ff",
}

RT = RuntimeConf(
    container_id="c0ffee",
    netns="/var/run/netns/cnitest-x",
    ifname="eth0",
    args=(("IgnoreUnknown", "1"),),
    capability_args=CAPABILITY_ARGS,
)


def make_list(version: str, plugins: list[dict[str, Any]], **extra: Any) -> NetworkConfigList:
    data = {"cniVersion": version, "name": "testnet", "plugins": plugins, **extra}
    return NetworkConfigList.from_dict(data, source="test")


def three_plugin_list(version: str) -> NetworkConfigList:
    return make_list(
        version,
        [
            {"type": "first", "bridge": "cnitst0"},
            {"type": "second", "capabilities": {"portMappings": True, "mac": False}},
            {"type": "third", "capabilities": {"bandwidth": True, "ips": True}},
        ],
    )


@pytest.fixture
def record(tmp_path: Path) -> Path:
    return tmp_path / "calls.jsonl"


@pytest.fixture
def bin_dir(tmp_path: Path, record: Path) -> Path:
    """A bin dir with fake plugins first, second and third that chain results like tuning."""
    path = tmp_path / "bin"
    write_fake_plugin(path, "first", record, stdout={"ADD": json.dumps(RESULT_100)})
    write_fake_plugin(path, "second", record, echo_prev_result=True)
    write_fake_plugin(path, "third", record, echo_prev_result=True)
    return path


def test_runtime_rejects_non_positive_timeout(tmp_path: Path) -> None:
    """A timeout of zero seconds is a config error."""
    with pytest.raises(ConfigError, match="timeout"):
        CNIRuntime([tmp_path], timeout=0)


async def test_add_runs_plugins_in_order(bin_dir: Path, record: Path) -> None:
    """ADD runs every plugin once, in list order, with CNI_COMMAND=ADD."""
    runtime = CNIRuntime([bin_dir], timeout=10)

    await runtime.add_network(three_plugin_list("1.0.0"), RT)

    calls = read_records(record)
    assert [call["type"] for call in calls] == ["first", "second", "third"]
    assert {call["env"]["CNI_COMMAND"] for call in calls} == {"ADD"}
    assert {call["env"]["CNI_ARGS"] for call in calls} == {"IgnoreUnknown=1"}


async def test_add_injects_name_version_prev_result(bin_dir: Path, record: Path) -> None:
    """Each plugin gets the list's name and cniVersion, and prevResult after the first."""
    runtime = CNIRuntime([bin_dir], timeout=10)

    await runtime.add_network(three_plugin_list("1.0.0"), RT)

    configs = [call["stdin"] for call in read_records(record)]
    assert [config["name"] for config in configs] == ["testnet"] * 3
    assert [config["cniVersion"] for config in configs] == ["1.0.0"] * 3
    assert "prevResult" not in configs[0]
    assert configs[1]["prevResult"] == RESULT_100
    assert configs[2]["prevResult"] == RESULT_100
    assert configs[0]["bridge"] == "cnitst0"


async def test_add_runtime_config_only_declared(bin_dir: Path, record: Path) -> None:
    """runtimeConfig holds only the capabilities a plugin enables and the caller passed."""
    runtime = CNIRuntime([bin_dir], timeout=10)

    await runtime.add_network(three_plugin_list("1.0.0"), RT)

    configs = [call["stdin"] for call in read_records(record)]
    assert "runtimeConfig" not in configs[0]
    assert configs[1]["runtimeConfig"] == {"portMappings": CAPABILITY_ARGS["portMappings"]}
    assert configs[2]["runtimeConfig"] == {"bandwidth": CAPABILITY_ARGS["bandwidth"]}


async def test_add_prev_result_converted_to_list_version(
    tmp_path: Path, bin_dir: Path, record: Path
) -> None:
    """A 0.2.0 result from the first plugin reaches the next one in the list's version."""
    write_fake_plugin(bin_dir, "first", record, stdout={"ADD": json.dumps(RESULT_020)})
    runtime = CNIRuntime([bin_dir], timeout=10)

    result = await runtime.add_network(three_plugin_list("0.4.0"), RT)

    prev = read_records(record)[1]["stdin"]["prevResult"]
    assert prev == {
        "cniVersion": "0.4.0",
        "ips": [{"version": "4", "address": "10.98.0.2/24", "gateway": "10.98.0.1"}],
        "routes": [{"dst": "0.0.0.0/0"}],
    }
    assert result.cni_version == "0.4.0"
    assert result.raw == prev


async def test_add_returns_last_result(tmp_path: Path, bin_dir: Path, record: Path) -> None:
    """The list's result is the last plugin's result."""
    last = {**RESULT_100, "ips": [{"interface": 0, "address": "10.98.0.9/24"}]}
    write_fake_plugin(bin_dir, "third", record, stdout={"ADD": json.dumps(last)})
    runtime = CNIRuntime([bin_dir], timeout=10)

    result = await runtime.add_network(three_plugin_list("1.0.0"), RT)

    assert result.addresses() == ["10.98.0.9/24"]
    assert result.raw == last


async def test_add_missing_plugin_runs_nothing(bin_dir: Path, record: Path) -> None:
    """A missing plugin anywhere in the list fails ADD before any plugin runs."""
    net = make_list("1.0.0", [{"type": "first"}, {"type": "absent"}])
    runtime = CNIRuntime([bin_dir], timeout=10)

    with pytest.raises(PluginNotFoundError, match="'absent'"):
        await runtime.add_network(net, RT)

    assert read_records(record) == []


async def test_add_stops_at_failing_plugin(bin_dir: Path, record: Path) -> None:
    """A failing plugin stops ADD and its error propagates."""
    error = json.dumps({"code": 7, "msg": "bad config"})
    write_fake_plugin(bin_dir, "second", record, stdout={"ADD": error}, exit_code=1)
    runtime = CNIRuntime([bin_dir], timeout=10)

    with pytest.raises(PluginError) as excinfo:
        await runtime.add_network(three_plugin_list("1.0.0"), RT)

    assert excinfo.value.plugin == "second"
    assert excinfo.value.code == 7
    assert [call["type"] for call in read_records(record)] == ["first", "second"]


async def test_add_without_result_raises(bin_dir: Path, record: Path) -> None:
    """ADD that exits 0 without printing a result raises PluginError 999."""
    write_fake_plugin(bin_dir, "first", record)
    net = make_list("1.0.0", [{"type": "first"}])
    runtime = CNIRuntime([bin_dir], timeout=10)

    with pytest.raises(PluginError) as excinfo:
        await runtime.add_network(net, RT)

    assert excinfo.value.code == 999
    assert "no result" in excinfo.value.msg


async def test_add_malformed_result_raises(bin_dir: Path, record: Path) -> None:
    """ADD with a result that does not parse raises PluginError naming the field."""
    bad = {"cniVersion": "1.0.0", "ips": [{"address": "not-an-ip/24"}]}
    write_fake_plugin(bin_dir, "first", record, stdout={"ADD": json.dumps(bad)})
    net = make_list("1.0.0", [{"type": "first"}])
    runtime = CNIRuntime([bin_dir], timeout=10)

    with pytest.raises(PluginError, match=r"ips\[0\].address"):
        await runtime.add_network(net, RT)


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0", "1.1.0"])
async def test_del_reverse_with_prev_result(bin_dir: Path, record: Path, version: str) -> None:
    """DEL of a 0.4.0+ list runs in reverse and gives every plugin the stored result."""
    runtime = CNIRuntime([bin_dir], timeout=10)

    await runtime.del_network(three_plugin_list(version), RT, prev_result=RESULT_100)

    calls = read_records(record)
    assert [call["type"] for call in calls] == ["third", "second", "first"]
    assert {call["env"]["CNI_COMMAND"] for call in calls} == {"DEL"}
    prevs = [call["stdin"]["prevResult"] for call in calls]
    assert [prev["cniVersion"] for prev in prevs] == [version] * 3
    assert [prev["ips"][0]["address"] for prev in prevs] == ["10.98.0.2/24"] * 3


@pytest.mark.parametrize("version", ["0.1.0", "0.2.0", "0.3.0", "0.3.1"])
async def test_del_before_040_no_prev_result(bin_dir: Path, record: Path, version: str) -> None:
    """DEL of a list older than 0.4.0 runs in reverse without prevResult."""
    runtime = CNIRuntime([bin_dir], timeout=10)

    await runtime.del_network(three_plugin_list(version), RT, prev_result=RESULT_100)

    calls = read_records(record)
    assert [call["type"] for call in calls] == ["third", "second", "first"]
    assert ["prevResult" in call["stdin"] for call in calls] == [False, False, False]


async def test_del_keeps_runtime_config(bin_dir: Path, record: Path) -> None:
    """DEL passes the declared capabilities as runtimeConfig, so portmap can clean up."""
    runtime = CNIRuntime([bin_dir], timeout=10)

    await runtime.del_network(three_plugin_list("1.0.0"), RT, prev_result=None)

    configs = {call["type"]: call["stdin"] for call in read_records(record)}
    assert configs["second"]["runtimeConfig"] == {"portMappings": CAPABILITY_ARGS["portMappings"]}
    assert "prevResult" not in configs["second"]


async def test_del_empty_netns(bin_dir: Path, record: Path) -> None:
    """DEL runs with an empty netns when the namespace is gone."""
    runtime = CNIRuntime([bin_dir], timeout=10)
    rt = RuntimeConf(container_id="c0ffee", netns="", ifname="eth0")

    await runtime.del_network(three_plugin_list("1.0.0"), rt, prev_result=RESULT_100)

    assert {call["env"]["CNI_NETNS"] for call in read_records(record)} == {""}


async def test_del_unusable_prev_result_still_runs(bin_dir: Path, record: Path) -> None:
    """A stored result that does not parse is left out and DEL still runs every plugin."""
    runtime = CNIRuntime([bin_dir], timeout=10)

    await runtime.del_network(three_plugin_list("1.0.0"), RT, prev_result={"cniVersion": "7"})

    calls = read_records(record)
    assert [call["type"] for call in calls] == ["third", "second", "first"]
    assert ["prevResult" in call["stdin"] for call in calls] == [False, False, False]


async def test_del_stops_at_failing_plugin(bin_dir: Path, record: Path) -> None:
    """A failing DEL stops the list and its error propagates."""
    write_fake_plugin(bin_dir, "second", record, stderr="iptables failed", exit_code=1)
    runtime = CNIRuntime([bin_dir], timeout=10)

    with pytest.raises(PluginError) as excinfo:
        await runtime.del_network(three_plugin_list("1.0.0"), RT, prev_result=None)

    assert excinfo.value.command == "DEL"
    assert excinfo.value.msg == "iptables failed"
    assert [call["type"] for call in read_records(record)] == ["third", "second"]


async def test_check_runs_in_order_with_prev_result(bin_dir: Path, record: Path) -> None:
    """CHECK runs in list order and gives every plugin the stored result."""
    runtime = CNIRuntime([bin_dir], timeout=10)

    await runtime.check_network(three_plugin_list("1.0.0"), RT, prev_result=RESULT_100)

    calls = read_records(record)
    assert [call["type"] for call in calls] == ["first", "second", "third"]
    assert {call["env"]["CNI_COMMAND"] for call in calls} == {"CHECK"}
    assert all(call["stdin"]["prevResult"] == RESULT_100 for call in calls)


async def test_check_disabled_runs_nothing(bin_dir: Path, record: Path) -> None:
    """CHECK of a list with disableCheck runs no plugin."""
    net = make_list("1.0.0", [{"type": "first"}], disableCheck=True)
    runtime = CNIRuntime([bin_dir], timeout=10)

    await runtime.check_network(net, RT, prev_result=RESULT_100)

    assert read_records(record) == []


async def test_check_before_040_raises(bin_dir: Path, record: Path) -> None:
    """CHECK of a list older than 0.4.0 raises CNIError."""
    runtime = CNIRuntime([bin_dir], timeout=10)

    with pytest.raises(CNIError, match="0.4.0"):
        await runtime.check_network(three_plugin_list("0.3.1"), RT, prev_result=RESULT_100)

    assert read_records(record) == []


def version_probes(record: Path) -> list[dict[str, Any]]:
    """Return the VERSION calls in ``record``, oldest first."""
    calls = read_records(record, version_calls=True)
    return [call for call in calls if call["env"]["CNI_COMMAND"] == "VERSION"]


async def test_add_probes_versions_before_add(bin_dir: Path, record: Path) -> None:
    """ADD runs each plugin with VERSION and the list's cniVersion before the first ADD."""
    runtime = CNIRuntime([bin_dir], timeout=10)

    await runtime.add_network(three_plugin_list("0.4.0"), RT)

    calls = read_records(record, version_calls=True)
    commands = [(call["type"], call["env"]["CNI_COMMAND"]) for call in calls]
    assert commands[:3] == [("first", "VERSION"), ("second", "VERSION"), ("third", "VERSION")]
    assert [command for _, command in commands[3:]] == ["ADD"] * 3
    assert [call["stdin"] for call in calls[:3]] == [{"cniVersion": "0.4.0"}] * 3


async def test_probe_cached_per_binary(bin_dir: Path, record: Path) -> None:
    """A second ADD, and two ADDs at once, run no further VERSION calls."""
    runtime = CNIRuntime([bin_dir], timeout=10)
    other = RuntimeConf(container_id="other", netns=RT.netns, ifname="eth0")

    await asyncio.gather(
        runtime.add_network(three_plugin_list("1.0.0"), RT),
        runtime.add_network(three_plugin_list("1.0.0"), other),
    )
    await runtime.add_network(three_plugin_list("1.0.0"), RT)

    assert sorted(call["type"] for call in version_probes(record)) == ["first", "second", "third"]
    assert len(read_records(record)) == 9


async def test_probe_repeated_after_binary_changes(bin_dir: Path, record: Path) -> None:
    """A plugin binary replaced after its probe is asked again before its next use."""
    runtime = CNIRuntime([bin_dir], timeout=10)
    net = three_plugin_list("1.0.0")
    await runtime.add_network(net, RT)

    write_fake_plugin(bin_dir, "second", record, supported_versions=["0.4.0"])
    with pytest.raises(PluginVersionError):
        await runtime.add_network(net, RT)

    assert [call["type"] for call in version_probes(record)] == [
        "first",
        "second",
        "third",
        "second",
    ]


async def test_add_unsupported_version_runs_nothing(bin_dir: Path, record: Path) -> None:
    """A plugin without the list's cniVersion fails ADD with a message that names the fix."""
    write_fake_plugin(bin_dir, "third", record, supported_versions=["0.3.1", "0.4.0"])
    runtime = CNIRuntime([bin_dir], timeout=10)

    with pytest.raises(PluginVersionError) as excinfo:
        await runtime.add_network(three_plugin_list("1.0.0"), RT)

    error = excinfo.value
    assert error.plugin == "third"
    assert error.path == str(bin_dir / "third")
    assert error.cni_version == "1.0.0"
    assert error.supported == ("0.3.1", "0.4.0")
    assert str(error) == (
        f"network 'testnet' has cniVersion 1.0.0, but CNI plugin 'third' at {bin_dir / 'third'} "
        "supports only 0.3.1, 0.4.0: set the network's cniVersion to one of those, "
        "or install a third plugin that supports 1.0.0"
    )
    assert read_records(record) == []


async def test_add_ipam_plugin_probed(bin_dir: Path, record: Path) -> None:
    """The IPAM plugin a plugin delegates to must be installed and support the version too."""
    net = make_list("1.0.0", [{"type": "first", "ipam": {"type": "ipam"}}])
    runtime = CNIRuntime([bin_dir], timeout=10)

    with pytest.raises(PluginNotFoundError, match="plugin 'ipam' of network 'testnet' not found"):
        await runtime.add_network(net, RT)
    write_fake_plugin(bin_dir, "ipam", record, supported_versions=["0.4.0"])
    with pytest.raises(PluginVersionError, match="plugin 'ipam'"):
        await runtime.add_network(net, RT)

    assert [call["type"] for call in version_probes(record)] == ["first", "ipam"]
    assert read_records(record) == []


async def test_probe_legacy_plugin_supports_010(bin_dir: Path, record: Path) -> None:
    """A plugin that rejects VERSION as unknown supports 0.1.0 only, as libcni assumes."""
    unknown = json.dumps({"code": 4, "msg": "unknown CNI_COMMAND: VERSION"})
    write_fake_plugin(bin_dir, "old", record, stdout={"VERSION": unknown}, exit_code=1)
    runtime = CNIRuntime([bin_dir], timeout=10)

    with pytest.raises(PluginVersionError) as excinfo:
        await runtime.add_network(make_list("0.2.0", [{"type": "old"}]), RT)

    assert excinfo.value.supported == ("0.1.0",)


async def test_probe_020_output_without_list(bin_dir: Path, record: Path) -> None:
    """VERSION output of 0.2.0 without supportedVersions means 0.1.0 and 0.2.0."""
    output = {"VERSION": json.dumps({"cniVersion": "0.2.0"}), "ADD": json.dumps(RESULT_020)}
    write_fake_plugin(bin_dir, "old", record, stdout=output)
    runtime = CNIRuntime([bin_dir], timeout=10)

    result = await runtime.add_network(make_list("0.2.0", [{"type": "old"}]), RT)
    with pytest.raises(PluginVersionError) as excinfo:
        await runtime.add_network(make_list("0.3.1", [{"type": "old"}]), RT)

    assert result.addresses() == ["10.98.0.2/24"]
    assert excinfo.value.supported == ("0.1.0", "0.2.0")


@pytest.mark.parametrize(
    ("output", "exit_code", "message"),
    [
        ("", 0, "invalid VERSION output: the plugin printed nothing"),
        ("{}", 0, "invalid VERSION output: cniVersion is missing"),
        ('{"cniVersion": "1.0.0"}', 0, "supportedVersions is missing"),
        ('{"cniVersion": "1.0.0", "supportedVersions": "1.0.0"}', 0, "not a list"),
        ('{"code": 7, "msg": "broken"}', 1, "VERSION of plugin 'first'.*broken"),
    ],
)
async def test_probe_failure_raises_plugin_error(
    bin_dir: Path, record: Path, output: str, exit_code: int, message: str
) -> None:
    """A VERSION call that fails or prints no usable list raises PluginError and runs no ADD."""
    write_fake_plugin(bin_dir, "first", record, stdout={"VERSION": output}, exit_code=exit_code)
    runtime = CNIRuntime([bin_dir], timeout=10)

    with pytest.raises(PluginError, match=message) as excinfo:
        await runtime.add_network(three_plugin_list("1.0.0"), RT)

    assert excinfo.value.command == "VERSION"
    assert excinfo.value.plugin == "first"
    assert read_records(record) == []


async def test_probe_failure_not_cached(bin_dir: Path, record: Path) -> None:
    """A VERSION call that failed is made again at the next ADD."""
    write_fake_plugin(bin_dir, "first", record, stdout={"VERSION": "{}"})
    runtime = CNIRuntime([bin_dir], timeout=10)
    with pytest.raises(PluginError):
        await runtime.add_network(three_plugin_list("1.0.0"), RT)

    write_fake_plugin(bin_dir, "first", record, stdout={"ADD": json.dumps(RESULT_100)})
    await runtime.add_network(three_plugin_list("1.0.0"), RT)

    assert [call["type"] for call in version_probes(record)][:2] == ["first", "first"]


async def test_del_runs_no_probe(bin_dir: Path, record: Path) -> None:
    """DEL runs even when a plugin lacks the list's version, and makes no VERSION call."""
    write_fake_plugin(bin_dir, "second", record, supported_versions=["0.4.0"])
    runtime = CNIRuntime([bin_dir], timeout=10)

    await runtime.del_network(three_plugin_list("1.0.0"), RT, prev_result=RESULT_100)

    assert version_probes(record) == []
    assert [call["type"] for call in read_records(record)] == ["third", "second", "first"]


async def test_check_probes_versions(bin_dir: Path, record: Path) -> None:
    """CHECK fails before any plugin runs when a plugin lacks the list's version."""
    write_fake_plugin(bin_dir, "first", record, supported_versions=["0.4.0"])
    runtime = CNIRuntime([bin_dir], timeout=10)

    with pytest.raises(PluginVersionError, match="plugin 'first'"):
        await runtime.check_network(three_plugin_list("1.0.0"), RT, prev_result=RESULT_100)

    assert read_records(record) == []


# Integration test with the real plugins.

PLUGIN_DIR = Path("/usr/lib/cni")
BRIDGE_NAME = "cnitst0"
SUBNET_PREFIX = "10.98.0."


def missing_prerequisites() -> list[str]:
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    for plugin in ("bridge", "host-local", "loopback"):
        if not (PLUGIN_DIR / plugin).is_file():
            missing.append(str(PLUGIN_DIR / plugin))
    for tool in ("ip", "iptables-save"):
        if shutil.which(tool) is None:
            missing.append(tool)
    return missing


def require_prerequisites() -> None:
    """Fail on CI and skip elsewhere when the integration test cannot run."""
    missing = missing_prerequisites()
    if not missing:
        return
    reason = "integration test needs " + ", ".join(missing)
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def run(*command: str, check: bool = True) -> str:
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if check and completed.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed: {completed.stderr.strip()}")
    return completed.stdout


async def wait_for_no_veths(seconds: float) -> str:
    """Poll until no veth is attached to the test bridge and return what is left.

    The kernel destroys a deleted namespace, and the veth in it, in the background.
    """
    deadline = time.monotonic() + seconds
    while veths_on_bridge() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return veths_on_bridge()


def link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


def veths_on_bridge() -> str:
    return run("ip", "-o", "link", "show", "master", BRIDGE_NAME, check=False)


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace, and removal of it, the test bridge and ip_forward changes."""
    require_prerequisites()
    if link_exists(BRIDGE_NAME):
        pytest.fail(f"bridge {BRIDGE_NAME} already exists; remove it before running this test")
    forward = Path("/proc/sys/net/ipv4/ip_forward")
    forward_before = forward.read_text()
    name = f"cnitest-{secrets.token_hex(4)}"
    run("ip", "netns", "add", name)
    try:
        yield name
    finally:
        run("ip", "netns", "del", name, check=False)
        if link_exists(BRIDGE_NAME):
            run("ip", "link", "del", BRIDGE_NAME, check=False)
        # The bridge plugin enables IPv4 forwarding for isGateway.
        forward.write_text(forward_before)


def nat_chains() -> set[str]:
    """Return the names of the CNI- chains in the nat table."""
    lines = run("iptables-save", "-t", "nat").splitlines()
    return {line.split()[0][1:] for line in lines if line.startswith(":CNI-")}


def bridge_config(data_dir: Path) -> NetworkConfigList:
    """Return the 0.2.0 bridge reference config on the test bridge and subnet."""
    return NetworkConfigList.from_dict(
        {
            "cniVersion": "0.2.0",
            "name": "cnitest",
            "type": "bridge",
            "bridge": BRIDGE_NAME,
            "isGateway": True,
            "ipMasq": True,
            "ipam": {
                "type": "host-local",
                "subnet": "10.98.0.0/24",
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": str(data_dir),
            },
        },
        source="test-bridge.conf",
    )


def leases(data_dir: Path) -> list[str]:
    """Return the addresses that host-local has leased for the cnitest network."""
    lease_dir = data_dir / "cnitest"
    if not lease_dir.is_dir():
        return []
    return [path.name for path in lease_dir.iterdir() if path.name.startswith(SUBNET_PREFIX)]


@pytest.mark.integration
async def test_real_plugins_add_and_del(netns: str, tmp_path: Path) -> None:
    """The 0.2.0 bridge and loopback configs attach and detach with the real plugins."""
    data_dir = tmp_path / "ipam"
    bridge = bridge_config(data_dir)
    loopback = NetworkConfigList.from_dict(
        {"cniVersion": "0.2.0", "name": "lo", "type": "loopback"}, source="test-lo.conf"
    )
    container_id = f"cnitest{secrets.token_hex(8)}"
    netns_path = f"/var/run/netns/{netns}"
    eth0 = RuntimeConf(container_id=container_id, netns=netns_path, ifname="eth0")
    lo = RuntimeConf(container_id=container_id, netns=netns_path, ifname="lo")
    runtime = CNIRuntime([PLUGIN_DIR], timeout=30)
    chains_before = nat_chains()

    deleted = False
    try:
        bridge_result = await runtime.add_network(bridge, eth0)
        lo_result = await runtime.add_network(loopback, lo)

        assert bridge_result.cni_version == "0.2.0"
        assert lo_result.cni_version == "0.2.0"
        [address] = bridge_result.addresses()
        assert address.startswith(SUBNET_PREFIX)
        assert f"inet {address}" in run("ip", "-n", netns, "-o", "addr", "show", "dev", "eth0")
        assert ",UP" in run("ip", "-n", netns, "-o", "link", "show", "dev", "lo")
        assert container_id in run("iptables-save", "-t", "nat")
        new_chains = nat_chains() - chains_before
        assert new_chains != set()
        assert veths_on_bridge() != ""
        assert leases(data_dir) == [address.split("/")[0]]

        await runtime.del_network(loopback, lo, prev_result=lo_result.raw)
        await runtime.del_network(bridge, eth0, prev_result=bridge_result.raw)
        deleted = True

        assert leases(data_dir) == []
        assert container_id not in run("iptables-save", "-t", "nat")
        assert nat_chains() & new_chains == set()
        assert veths_on_bridge() == ""
        assert "eth0" not in run("ip", "-n", netns, "-o", "link", "show")
    finally:
        if not deleted:
            # Release the lease and the NAT rules that a failure left behind.
            with contextlib.suppress(CNIError):
                await runtime.del_network(bridge, eth0, prev_result=None)


def remove_nat_rules(container_id: str) -> None:
    """Delete the nat rules whose comment names ``container_id``, and their CNI- chains."""
    chains: set[str] = set()
    for line in run("iptables-save", "-t", "nat").splitlines():
        if not line.startswith("-A ") or container_id not in line:
            continue
        rule = shlex.split(line)[1:]
        chains.update(word for word in rule if word.startswith("CNI-"))
        run("iptables", "-t", "nat", "-D", *rule, check=False)
    for chain in chains:
        run("iptables", "-t", "nat", "-X", chain, check=False)


@pytest.mark.integration
async def test_real_plugins_del_after_netns_gone(netns: str, tmp_path: Path) -> None:
    """DEL with an empty netns releases the lease after the namespace is gone."""
    data_dir = tmp_path / "ipam"
    bridge = bridge_config(data_dir)
    container_id = f"cnitest{secrets.token_hex(8)}"
    eth0 = RuntimeConf(container_id=container_id, netns=f"/var/run/netns/{netns}", ifname="eth0")
    gone = RuntimeConf(container_id=container_id, netns="", ifname="eth0")
    runtime = CNIRuntime([PLUGIN_DIR], timeout=30)

    try:
        result = await runtime.add_network(bridge, eth0)
        assert len(leases(data_dir)) == 1
        run("ip", "netns", "del", netns)

        await runtime.del_network(bridge, gone, prev_result=result.raw)

        assert leases(data_dir) == []
        assert await wait_for_no_veths(seconds=10) == ""
    finally:
        with contextlib.suppress(CNIError):
            await runtime.del_network(bridge, gone, prev_result=None)
        # NOTE: bridge 1.1.1 finds the address for its ipMasq rules on the
        # interface inside the namespace, so DEL without a netns leaves them.
        remove_nat_rules(container_id)
