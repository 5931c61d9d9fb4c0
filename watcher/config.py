"""The daemon's TOML config file: loading, validation and defaults.

Every key has a default, so an empty file is a valid config. Unknown sections
and keys are rejected, because a misspelt key that is silently ignored leaves
the daemon running with a value the operator did not choose.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from watcher.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/cni-watcher/config.toml")

LOG_FORMATS = ("json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")

# containerd's rule for namespace names and container ids: runs of ASCII
# letters and digits joined by single '.', '_' or '-', at most 76 characters.
IDENTIFIER_RE = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*")
IDENTIFIER_MAX_LEN = 76

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

_T = TypeVar("_T")


@dataclass(frozen=True)
class ContainerdSettings:
    """containerd's socket and the namespaces to watch (empty: all)."""

    address: str = "/run/containerd/containerd.sock"
    namespaces: tuple[str, ...] = ()


@dataclass(frozen=True)
class CNISettings:
    """CNI config and plugin folders, default networks and the plugin timeout."""

    conf_dir: Path = Path("/etc/cni/net.d")
    bin_dirs: tuple[Path, ...] = (Path("/opt/cni/bin"), Path("/usr/lib/cni"))
    default_networks: tuple[str, ...] = ()
    plugin_timeout: float = 30.0


@dataclass(frozen=True)
class StateSettings:
    """Folders for checkpoints (kept across reboots) and network namespace pins (tmpfs)."""

    dir: Path = Path("/var/lib/cni-watcher")
    netns_dir: Path = Path("/run/cni-watcher/netns")


@dataclass(frozen=True)
class LabelSettings:
    """The prefix shared by every opt-in label."""

    prefix: str = "cni-watcher/"


@dataclass(frozen=True)
class LogSettings:
    """Log line format and minimum level."""

    format: Literal["json", "console"] = "json"
    level: str = "info"


@dataclass(frozen=True)
class DaemonSettings:
    """How often to resync, how much work to run at once, how long to wait at shutdown."""

    resync_interval: float = 300.0
    max_parallel: int = 16
    shutdown_timeout: float = 30.0


@dataclass(frozen=True)
class Config:
    """A validated cni-watcher config."""

    daemon: DaemonSettings = DaemonSettings()
    containerd: ContainerdSettings = ContainerdSettings()
    cni: CNISettings = CNISettings()
    state: StateSettings = StateSettings()
    labels: LabelSettings = LabelSettings()
    log: LogSettings = LogSettings()


def load_config(path: Path) -> Config:
    """Read and validate the config file at ``path``.

    Raises ConfigError naming the file, and for a bad value the key, the value
    and what is allowed.
    """
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; create it or pass --config") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc

    try:
        return parse_config(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse_config(data: Mapping[str, Any]) -> Config:
    """Build a Config from the parsed TOML document; raises ConfigError."""
    _reject_unknown(data, "", ("daemon", "containerd", "cni", "state", "labels", "log"))
    return Config(
        daemon=_parse_daemon(_section(data, "daemon")),
        containerd=_parse_containerd(_section(data, "containerd")),
        cni=_parse_cni(_section(data, "cni")),
        state=_parse_state(_section(data, "state")),
        labels=_parse_labels(_section(data, "labels")),
        log=_parse_log(_section(data, "log")),
    )


def find_setup_problems(config: Config) -> list[str]:
    """Return what in the host's setup would make attaches fail, for warnings at start.

    These do not stop the daemon, because the folders and networks may
    appear later, but an operator should hear about them before the first
    labelled container does.
    """
    from watcher.cni import load_conf_dir

    problems = []
    if not any(folder.is_dir() for folder in config.cni.bin_dirs):
        folders = ", ".join(str(folder) for folder in config.cni.bin_dirs)
        problems.append(f"none of cni.bin_dirs exists ({folders}); install the CNI plugins")
    conf = load_conf_dir(config.cni.conf_dir)
    problems += conf.problems
    for name in config.cni.default_networks:
        if name not in conf.networks:
            problems.append(
                f"cni.default_networks names {name!r}, which is not in {config.cni.conf_dir}"
            )
    return problems


def parse_duration(text: str) -> float:
    """Convert a duration such as ``30s``, ``500ms``, ``2m`` or ``1h30m`` to seconds.

    Raises ValueError when the text is not made of number-unit pairs.
    """
    parts = _DURATION_RE.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise ValueError("expected a duration such as 30s, 500ms, 2m or 1h30m")
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def is_identifier(text: str) -> bool:
    """Return whether ``text`` is a valid containerd namespace name or container id."""
    return len(text) <= IDENTIFIER_MAX_LEN and IDENTIFIER_RE.fullmatch(text) is not None


def _parse_daemon(section: Mapping[str, Any]) -> DaemonSettings:
    _reject_unknown(section, "daemon.", ("resync_interval", "max_parallel", "shutdown_timeout"))
    defaults = DaemonSettings()

    interval = _get(section, "daemon.resync_interval", defaults.resync_interval, _positive_duration)
    max_parallel = _get(section, "daemon.max_parallel", defaults.max_parallel, _positive_int)
    shutdown = _get(
        section, "daemon.shutdown_timeout", defaults.shutdown_timeout, _positive_duration
    )
    return DaemonSettings(interval, max_parallel, shutdown)


def _parse_containerd(section: Mapping[str, Any]) -> ContainerdSettings:
    _reject_unknown(section, "containerd.", ("address", "namespaces"))
    defaults = ContainerdSettings()

    address = _get(section, "containerd.address", defaults.address, _nonempty_str)
    namespaces = _get(section, "containerd.namespaces", defaults.namespaces, _identifier_list)
    return ContainerdSettings(address=address, namespaces=namespaces)


def _parse_cni(section: Mapping[str, Any]) -> CNISettings:
    _reject_unknown(section, "cni.", ("conf_dir", "bin_dirs", "default_networks", "plugin_timeout"))
    defaults = CNISettings()

    conf_dir = _get(section, "cni.conf_dir", defaults.conf_dir, _absolute_path)
    bin_dirs = _get(section, "cni.bin_dirs", defaults.bin_dirs, _path_list)
    default_networks = _get(section, "cni.default_networks", defaults.default_networks, _str_list)
    timeout = _get(section, "cni.plugin_timeout", defaults.plugin_timeout, _positive_duration)
    return CNISettings(conf_dir, bin_dirs, default_networks, timeout)


def _parse_state(section: Mapping[str, Any]) -> StateSettings:
    _reject_unknown(section, "state.", ("dir", "netns_dir"))
    defaults = StateSettings()

    state_dir = _get(section, "state.dir", defaults.dir, _absolute_path)
    netns_dir = _get(section, "state.netns_dir", defaults.netns_dir, _absolute_path)
    if state_dir == netns_dir:
        raise ConfigError(
            f"state.dir and state.netns_dir are both {str(state_dir)!r}; use two folders"
        )
    return StateSettings(dir=state_dir, netns_dir=netns_dir)


def _parse_labels(section: Mapping[str, Any]) -> LabelSettings:
    _reject_unknown(section, "labels.", ("prefix",))
    return LabelSettings(prefix=_get(section, "labels.prefix", "cni-watcher/", _nonempty_str))


def _parse_log(section: Mapping[str, Any]) -> LogSettings:
    _reject_unknown(section, "log.", ("format", "level"))

    log_format = _get(section, "log.format", "json", _choice(LOG_FORMATS))
    level = _get(section, "log.level", "info", _choice(LOG_LEVELS))
    return LogSettings(format=log_format, level=level)  # type: ignore[arg-type]


def _section(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] must be a table, got {value!r}")
    return value


def _reject_unknown(section: Mapping[str, Any], prefix: str, allowed: tuple[str, ...]) -> None:
    for key in section:
        if key not in allowed:
            names = ", ".join(prefix + name for name in allowed)
            raise ConfigError(f"unknown key {prefix}{key}; allowed keys are {names}")


def _get(section: Mapping[str, Any], key: str, default: _T, convert: Callable[[Any], _T]) -> _T:
    name = key.rsplit(".", 1)[1]
    if name not in section:
        return default
    value = section[name]
    try:
        return convert(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid value for {key}: {value!r}; {exc}") from None


def _nonempty_str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError("expected a non-empty string")
    return value


def _str_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise TypeError("expected a list of non-empty strings")
    return tuple(value)


def _identifier_list(value: Any) -> tuple[str, ...]:
    names = _str_list(value)
    for name in names:
        if not is_identifier(name):
            raise ValueError(
                f"{name!r} is not a containerd namespace name "
                "(letters and digits joined by single '.', '_' or '-')"
            )
    return names


def _absolute_path(value: Any) -> Path:
    path = Path(_nonempty_str(value))
    if not path.is_absolute():
        raise ValueError("expected an absolute path")
    return path


def _path_list(value: Any) -> tuple[Path, ...]:
    if not isinstance(value, list) or not value:
        raise TypeError("expected a non-empty list of absolute paths")
    return tuple(_absolute_path(item) for item in value)


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(_nonempty_str(value))
    if seconds <= 0:
        raise ValueError("expected a duration above zero")
    return seconds


def _positive_int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError("expected a whole number of at least 1")
    return value


def _choice(allowed: tuple[str, ...]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in allowed:
            raise ValueError("allowed values are " + ", ".join(allowed))
        return str(value)

    return convert
