"""Tests for loading and validating the TOML config file."""

from __future__ import annotations

from pathlib import Path

import pytest

from watcher.cli import main
from watcher.config import Config, load_config, parse_duration
from watcher.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_shipped_config_is_the_defaults() -> None:
    """The config shipped in config/ parses to exactly the built-in defaults."""
    assert load_config(REPO / "config" / "config.toml") == Config()


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    """An empty file is valid and yields the documented defaults."""
    config = load_config(write(tmp_path, ""))

    assert config.daemon.resync_interval == 300.0
    assert config.daemon.max_parallel == 16
    assert config.daemon.shutdown_timeout == 30.0
    assert config.containerd.address == "/run/containerd/containerd.sock"
    assert config.containerd.namespaces == ()
    assert config.cni.conf_dir == Path("/etc/cni/net.d")
    assert config.cni.bin_dirs == (Path("/opt/cni/bin"), Path("/usr/lib/cni"))
    assert config.cni.plugin_timeout == 30.0
    assert config.state.dir == Path("/var/lib/cni-watcher")
    assert config.state.netns_dir == Path("/run/cni-watcher/netns")
    assert config.labels.prefix == "cni-watcher/"
    assert config.log.format == "json"
    assert config.log.level == "info"


def test_values_override_defaults(tmp_path: Path) -> None:
    """Every key in the file replaces its default."""
    config = load_config(
        write(
            tmp_path,
            """
            [daemon]
            resync_interval = "1m"
            max_parallel = 4
            shutdown_timeout = "10s"
            [containerd]
            address = "/tmp/c.sock"
            namespaces = ["example", "ci-runners"]
            [cni]
            conf_dir = "/srv/net.d"
            bin_dirs = ["/srv/cni"]
            default_networks = ["mynet", "lo"]
            plugin_timeout = "1m30s"
            [labels]
            prefix = "net.example.com/"
            [log]
            format = "console"
            level = "debug"
            """,
        )
    )

    assert config.daemon.resync_interval == 60.0
    assert config.daemon.max_parallel == 4
    assert config.daemon.shutdown_timeout == 10.0
    assert config.containerd.namespaces == ("example", "ci-runners")
    assert config.cni.bin_dirs == (Path("/srv/cni"),)
    assert config.cni.default_networks == ("mynet", "lo")
    assert config.cni.plugin_timeout == 90.0
    assert config.labels.prefix == "net.example.com/"
    assert config.log.format == "console"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[cni]\nplugin_timeout = "soon"', "cni.plugin_timeout: 'soon'"),
        ('[cni]\nplugin_timeout = "0s"', "above zero"),
        ("[daemon]\nmax_parallel = 0", "daemon.max_parallel: 0"),
        ("[daemon]\nmax_parallel = true", "at least 1"),
        ('[daemon]\nresync_interval = "often"', "daemon.resync_interval"),
        ("[cni]\nplugin_timeout = 30", "cni.plugin_timeout: 30"),
        ('[cni]\nconf_dri = "/x"', "unknown key cni.conf_dri"),
        ("[cnii]\n", "unknown key cnii"),
        ("[cni]\nbin_dirs = []", "cni.bin_dirs"),
        ('[cni]\nbin_dirs = ["relative"]', "absolute path"),
        ('[containerd]\nnamespaces = ["bad name"]', "not a containerd namespace name"),
        ('[log]\nformat = "xml"', "allowed values are json, console"),
        ('[log]\nlevel = "trace"', "log.level"),
        ('[state]\ndir = "/a"\nnetns_dir = "/a"', "use two folders"),
        ("containerd = 1", "[containerd] must be a table"),
        ("[cni\n", "not valid TOML"),
    ],
)
def test_invalid_value_names_key(tmp_path: Path, text: str, expected: str) -> None:
    """Each invalid config raises ConfigError naming the key or the problem."""
    path = write(tmp_path, text)

    with pytest.raises(ConfigError) as raised:
        load_config(path)

    assert expected in str(raised.value)
    assert str(path) in str(raised.value)


def test_missing_file_is_error(tmp_path: Path) -> None:
    """A config path that does not exist raises ConfigError naming it."""
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")


def test_cli_exits_2_on_invalid_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI prints one line naming key and value and exits with status 2."""
    path = write(tmp_path, '[log]\nlevel = "loud"\n')

    status = main(["run", "--config", str(path)])

    assert status == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("cni-watcher: ")
    assert "log.level" in error
    assert "'loud'" in error
    assert len(error.splitlines()) == 1


def test_cli_check_config_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check-config prints that a valid file is valid and exits 0."""
    path = write(tmp_path, "")

    assert main(["check-config", "--config", str(path)]) == 0
    assert capsys.readouterr().out.strip() == f"{path}: valid"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("500ms", 0.5), ("2m", 120.0), ("1h30m", 5400.0), ("1.5s", 1.5)],
)
def test_parse_duration_units(text: str, seconds: float) -> None:
    """Durations combine number-unit pairs in ms, s, m and h."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "30", "s", "30 s", "-1s", "1d"])
def test_parse_duration_rejects(text: str) -> None:
    """Text that is not number-unit pairs raises ValueError."""
    with pytest.raises(ValueError):
        parse_duration(text)


def test_check_config_warns_about_setup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check-config stays valid but warns about missing plugins and unknown default networks."""
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    (conf_dir / "10-lo.conf").write_text(
        '{"cniVersion": "0.2.0", "name": "lo", "type": "loopback"}'
    )
    path = write(
        tmp_path,
        f'[cni]\nconf_dir = "{conf_dir}"\nbin_dirs = ["{tmp_path}/nobin"]\n'
        'default_networks = ["lo", "mynet"]\n',
    )

    assert main(["check-config", "--config", str(path)]) == 0

    warnings = capsys.readouterr().err.splitlines()
    assert warnings == [
        f"warning: none of cni.bin_dirs exists ({tmp_path}/nobin); install the CNI plugins",
        f"warning: cni.default_networks names 'mynet', which is not in {conf_dir}",
    ]
