"""Tests for watcher.cni.conf: parsing network configs and loading a config folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from watcher.cni.conf import NetworkConfigList, load_conf_dir, load_conf_file
from watcher.errors import ConfigError

BRIDGE_CONF = {
    "cniVersion": "0.2.0",
    "name": "cni0",
    "type": "bridge",
    "bridge": "cni0",
    "isGateway": True,
    "ipMasq": True,
    "ipam": {
        "type": "host-local",
        "subnet": "10.22.0.0/16",
        "routes": [{"dst": "0.0.0.0/0"}],
    },
}

LOOPBACK_CONF = {"cniVersion": "0.2.0", "name": "lo", "type": "loopback"}

PORTMAP_LIST = {
    "cniVersion": "1.0.0",
    "name": "web",
    "plugins": [
        {"type": "bridge", "bridge": "cnitst0", "ipam": {"type": "host-local"}},
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ],
}


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_from_dict_single_plugin_becomes_list() -> None:
    """A config without "plugins" becomes a list with that one plugin."""
    net = NetworkConfigList.from_dict(BRIDGE_CONF, source="10-bridge.conf")

    assert net.name == "cni0"
    assert net.cni_version == "0.2.0"
    assert net.plugin_types == ("bridge",)
    assert dict(net.plugins[0]) == BRIDGE_CONF
    assert net.source == "10-bridge.conf"
    assert not net.is_loopback


def test_from_dict_conflist_keeps_plugin_order() -> None:
    """A conflist keeps its plugins in the order written."""
    net = NetworkConfigList.from_dict(PORTMAP_LIST, source="20-web.conflist")

    assert net.plugin_types == ("bridge", "portmap")
    assert net.cni_version == "1.0.0"
    assert not net.disable_check


def test_required_plugin_types_include_ipam() -> None:
    """Required types are the plugins and their IPAM plugins, each once, in list order."""
    data = {
        **PORTMAP_LIST,
        "plugins": [
            *PORTMAP_LIST["plugins"],
            {"type": "ptp", "ipam": {"type": "host-local"}},
            {"type": "tuning", "ipam": "not an object"},
        ],
    }
    net = NetworkConfigList.from_dict(data, source="test")

    assert net.required_plugin_types == ("bridge", "host-local", "portmap", "ptp", "tuning")


def test_from_dict_loopback_is_loopback() -> None:
    """A list of only loopback plugins reports is_loopback."""
    net = NetworkConfigList.from_dict(LOOPBACK_CONF, source="99-lo.conf")

    assert net.is_loopback


def test_from_dict_plugins_are_copied() -> None:
    """Changing the input after parsing does not change the list."""
    data = json.loads(json.dumps(PORTMAP_LIST))
    net = NetworkConfigList.from_dict(data, source="x")

    data["plugins"][0]["bridge"] = "changed"

    assert net.plugins[0]["bridge"] == "cnitst0"


def test_to_dict_round_trip() -> None:
    """to_dict gives a conflist that from_dict parses into an equal list."""
    net = NetworkConfigList.from_dict({**PORTMAP_LIST, "disableCheck": True}, source="x")

    data = net.to_dict()
    again = NetworkConfigList.from_dict(json.loads(json.dumps(data)), source="x")

    assert data["disableCheck"] is True
    assert data["plugins"] == PORTMAP_LIST["plugins"]
    assert again == net


def test_from_dict_disable_check_string() -> None:
    """disableCheck accepts the strings "true" and "false" as libcni does."""
    net = NetworkConfigList.from_dict({**PORTMAP_LIST, "disableCheck": "True"}, source="x")

    assert net.disable_check


def test_from_dict_cni_versions_picks_highest_supported() -> None:
    """cniVersions selects the highest version that is supported."""
    data = {**PORTMAP_LIST, "cniVersions": ["0.4.0", "1.1.0", "9.9.9"]}
    del data["cniVersion"]

    net = NetworkConfigList.from_dict(data, source="x")

    assert net.cni_version == "1.1.0"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"name": "n", "type": "bridge"}, "missing cniVersion"),
        ({"cniVersion": "0.5.0", "name": "n", "type": "bridge"}, "unsupported cniVersion 0.5.0"),
        ({"cniVersion": 1, "name": "n", "type": "bridge"}, "invalid cniVersion"),
        ({"cniVersion": "1.0.0", "type": "bridge"}, "missing network name"),
        ({"cniVersion": "1.0.0", "name": "bad name", "type": "x"}, "invalid network name"),
        ({"cniVersion": "1.0.0", "name": "n"}, "missing plugin type"),
        ({"cniVersion": "1.0.0", "name": "n", "plugins": []}, "plugins is empty"),
        ({"cniVersion": "1.0.0", "name": "n", "plugins": {}}, "invalid plugins"),
        ({"cniVersion": "1.0.0", "name": "n", "plugins": [{}]}, "plugin 0: missing plugin type"),
        ({"cniVersion": "1.0.0", "name": "n", "type": "../sh"}, "invalid plugin type"),
        ({"cniVersion": "1.0.0", "name": "n", "type": "x", "disableCheck": 1}, "disableCheck"),
        (["not", "an", "object"], "expected a JSON object"),
    ],
)
def test_from_dict_invalid_raises_config_error(data: Any, reason: str) -> None:
    """Each invalid config raises ConfigError naming the source and the reason."""
    with pytest.raises(ConfigError) as excinfo:
        NetworkConfigList.from_dict(data, source="/etc/cni/net.d/bad.conf")

    assert "/etc/cni/net.d/bad.conf" in str(excinfo.value)
    assert reason in str(excinfo.value)


def test_load_conf_file_invalid_json(tmp_path: Path) -> None:
    """A file that is not JSON raises ConfigError naming the file."""
    path = tmp_path / "10-broken.conf"
    path.write_text("{not json")

    with pytest.raises(ConfigError) as excinfo:
        load_conf_file(path)

    assert str(path) in str(excinfo.value)
    assert "invalid JSON" in str(excinfo.value)


def test_load_conf_dir_lexical_order(tmp_path: Path) -> None:
    """Files load in lexical order of their names, whatever their extension."""
    write_json(tmp_path / "20-b.conflist", {**PORTMAP_LIST, "name": "b"})
    write_json(tmp_path / "10-a.conf", {**LOOPBACK_CONF, "name": "a"})
    write_json(tmp_path / "30-c.json", {**BRIDGE_CONF, "name": "c"})

    conf_dir = load_conf_dir(tmp_path)

    assert list(conf_dir.networks) == ["a", "b", "c"]
    assert conf_dir.networks["a"].source == str(tmp_path / "10-a.conf")
    assert conf_dir.problems == ()


def test_load_conf_dir_reference_configs(tmp_path: Path) -> None:
    """The 0.2.0 bridge and loopback reference configs load as one-plugin lists."""
    write_json(tmp_path / "10-bridge.conf", BRIDGE_CONF)
    write_json(tmp_path / "99-loopback.conf", LOOPBACK_CONF)

    conf_dir = load_conf_dir(tmp_path)

    assert conf_dir.problems == ()
    assert conf_dir.networks["cni0"].plugin_types == ("bridge",)
    assert conf_dir.networks["lo"].plugin_types == ("loopback",)
    assert conf_dir.networks["lo"].is_loopback


def test_load_conf_dir_json_with_plugins_is_list(tmp_path: Path) -> None:
    """A .json file with "plugins" is read as a conflist."""
    write_json(tmp_path / "10-web.json", PORTMAP_LIST)

    conf_dir = load_conf_dir(tmp_path)

    assert conf_dir.networks["web"].plugin_types == ("bridge", "portmap")


def test_load_conf_dir_ignores_other_files(tmp_path: Path) -> None:
    """Files with other extensions and subfolders are not read."""
    (tmp_path / "README").write_text("not a config")
    (tmp_path / "10-a.conf.bak").write_text("{")
    (tmp_path / "sub.conf").mkdir()
    write_json(tmp_path / "10-a.conf", LOOPBACK_CONF)

    conf_dir = load_conf_dir(tmp_path)

    assert list(conf_dir.networks) == ["lo"]
    assert conf_dir.problems == ()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "invalid JSON"),
        (json.dumps({"name": "x", "type": "bridge"}), "missing cniVersion"),
        (json.dumps({"cniVersion": "0.9.0", "name": "x", "type": "b"}), "unsupported cniVersion"),
        (json.dumps({"cniVersion": "0.2.0", "type": "bridge"}), "missing network name"),
    ],
)
def test_load_conf_dir_bad_file_skipped(tmp_path: Path, content: str, reason: str) -> None:
    """A bad file is reported with its name and reason, and the others still load."""
    (tmp_path / "10-bad.conf").write_text(content)
    write_json(tmp_path / "20-lo.conf", LOOPBACK_CONF)

    conf_dir = load_conf_dir(tmp_path)

    assert list(conf_dir.networks) == ["lo"]
    assert len(conf_dir.problems) == 1
    assert str(tmp_path / "10-bad.conf") in conf_dir.problems[0]
    assert reason in conf_dir.problems[0]


def test_load_conf_dir_duplicate_name_skipped(tmp_path: Path) -> None:
    """A second file with a loaded network name is reported and the first one wins."""
    write_json(tmp_path / "10-first.conf", BRIDGE_CONF)
    write_json(tmp_path / "20-second.conflist", {**PORTMAP_LIST, "name": "cni0"})

    conf_dir = load_conf_dir(tmp_path)

    assert conf_dir.networks["cni0"].plugin_types == ("bridge",)
    assert len(conf_dir.problems) == 1
    assert str(tmp_path / "20-second.conflist") in conf_dir.problems[0]
    assert "already loaded from" in conf_dir.problems[0]
    assert str(tmp_path / "10-first.conf") in conf_dir.problems[0]


def test_load_conf_dir_missing_folder(tmp_path: Path) -> None:
    """A missing folder gives no networks and one problem naming it."""
    missing = tmp_path / "absent"

    conf_dir = load_conf_dir(missing)

    assert dict(conf_dir.networks) == {}
    assert len(conf_dir.problems) == 1
    assert str(missing) in conf_dir.problems[0]
    assert "not found" in conf_dir.problems[0]


def test_load_conf_dir_empty_folder(tmp_path: Path) -> None:
    """An empty folder gives no networks and no problems."""
    conf_dir = load_conf_dir(tmp_path)

    assert dict(conf_dir.networks) == {}
    assert conf_dir.problems == ()
