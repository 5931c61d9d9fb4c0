"""CNI network configurations: parsing one file and loading a config folder.

The rules follow libcni: a folder's ``.conf``, ``.conflist`` and ``.json``
files are read in lexical order of their names, a network is found by its
``name``, and a single-plugin config becomes a list with that one plugin.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from watcher.cni.version import SUPPORTED_VERSIONS, is_supported, version_key
from watcher.errors import ConfigError

CONF_EXTENSIONS = (".conf", ".conflist", ".json")

# libcni's rule for network names and container IDs: an ASCII letter or digit,
# then letters, digits, '_', '.' or '-'.
_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")


@dataclass(frozen=True)
class NetworkConfigList:
    """A CNI network: a name, a spec version and the plugins that run in order.

    ``plugins`` contains each plugin's config as written, without the ``name``,
    ``cniVersion`` and ``prevResult`` that the runtime injects before a call.
    ``source`` is the file the list was loaded from, or a label for lists built
    in code.
    """

    name: str
    cni_version: str
    plugins: tuple[Mapping[str, Any], ...]
    disable_check: bool = False
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Return the list in conflist JSON form, as stored in checkpoints."""
        data: dict[str, Any] = {
            "cniVersion": self.cni_version,
            "name": self.name,
            "plugins": [copy.deepcopy(dict(plugin)) for plugin in self.plugins],
        }
        if self.disable_check:
            data["disableCheck"] = True
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str) -> NetworkConfigList:
        """Build a list from a parsed conflist, or from a single-plugin config.

        A mapping without ``plugins`` is a single-plugin config and becomes a
        list with that plugin. Raises ConfigError, naming ``source`` and the
        reason, when a required field is missing or invalid.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")

        name = _read_name(data, source)
        cni_version = _read_cni_version(data, source)
        disable_check = _read_bool(data, "disableCheck", source)
        if "plugins" in data:
            plugins = _read_plugins(data["plugins"], source)
        else:
            plugins = (_read_plugin(data, source, where="config"),)

        return cls(
            name=name,
            cni_version=cni_version,
            plugins=plugins,
            disable_check=disable_check,
            source=source,
        )

    @property
    def plugin_types(self) -> tuple[str, ...]:
        """The ``type`` of each plugin, in the order ADD runs them."""
        return tuple(str(plugin["type"]) for plugin in self.plugins)

    @property
    def required_plugin_types(self) -> tuple[str, ...]:
        """Each plugin type the list runs, once, in order: its plugins and their IPAM plugins.

        A plugin runs the IPAM plugin named in its ``ipam.type`` itself, and
        finds it through ``CNI_PATH``, so that binary has to be in the bin dirs
        and support the list's version too.
        """
        types: list[str] = []
        for plugin in self.plugins:
            ipam = plugin.get("ipam")
            ipam_type = ipam.get("type") if isinstance(ipam, Mapping) else None
            for plugin_type in (plugin["type"], ipam_type):
                if isinstance(plugin_type, str) and plugin_type and plugin_type not in types:
                    types.append(plugin_type)
        return tuple(types)

    @property
    def is_loopback(self) -> bool:
        """Whether every plugin in the list is of type ``loopback``."""
        return all(plugin_type == "loopback" for plugin_type in self.plugin_types)


@dataclass(frozen=True)
class ConfDir:
    """The networks loaded from a config folder, and the files that were skipped.

    ``networks`` maps each network name to its list, in the order the files
    were read. Each entry of ``problems`` names a skipped file and the reason.
    """

    networks: Mapping[str, NetworkConfigList] = field(default_factory=lambda: MappingProxyType({}))
    problems: tuple[str, ...] = ()


def load_conf_dir(conf_dir: Path) -> ConfDir:
    """Load every network config in ``conf_dir`` and report the files skipped.

    Files ending in ``.conf``, ``.conflist`` or ``.json`` are read in lexical
    order of their names. A file that cannot be read or parsed, or that names a
    network already loaded from an earlier file, is skipped and reported in
    ``problems``. A missing or unreadable folder gives no networks and one
    problem. Unreadable or invalid files become problems instead of errors.
    """
    if not conf_dir.is_dir():
        return ConfDir(problems=(f"{conf_dir}: config folder not found",))
    try:
        paths = _list_conf_files(conf_dir)
    except OSError as err:
        return ConfDir(problems=(f"{conf_dir}: cannot list config folder: {err}",))

    networks: dict[str, NetworkConfigList] = {}
    problems: list[str] = []
    for path in paths:
        try:
            network = load_conf_file(path)
        except ConfigError as err:
            problems.append(str(err))
            continue
        if network.name in networks:
            first = networks[network.name].source
            problems.append(f"{path}: network name {network.name!r} already loaded from {first}")
            continue
        networks[network.name] = network

    return ConfDir(networks=MappingProxyType(networks), problems=tuple(problems))


def load_conf_file(path: Path) -> NetworkConfigList:
    """Read and parse one config file.

    Raises ConfigError, naming the file and the reason, when the file cannot be
    read, is not valid JSON, or is not a valid network config.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read file: {err}") from err

    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON: {err}") from err

    return NetworkConfigList.from_dict(data, source=str(path))


def _list_conf_files(conf_dir: Path) -> list[Path]:
    """Return the config files in ``conf_dir``, sorted by name, without subfolders."""
    paths = [
        path for path in conf_dir.iterdir() if path.suffix in CONF_EXTENSIONS and not path.is_dir()
    ]
    return sorted(paths, key=lambda path: path.name)


def _read_name(data: Mapping[str, Any], source: str) -> str:
    name = data.get("name")
    if name is None:
        raise ConfigError(f"{source}: missing network name")
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise ConfigError(
            f"{source}: invalid network name {name!r}: expected a letter or digit, "
            "then letters, digits, '_', '.' or '-'"
        )
    return name


def _read_cni_version(data: Mapping[str, Any], source: str) -> str:
    """Return the spec version to use, from ``cniVersion`` and ``cniVersions``.

    ``cniVersions`` (spec 1.1.0) lists several versions, and the highest one
    that cni-watcher supports wins, as in libcni.
    """
    candidates: list[str] = []
    version = data.get("cniVersion")
    if version is not None:
        if not isinstance(version, str):
            raise ConfigError(f"{source}: invalid cniVersion {version!r}: expected a string")
        candidates.append(version)
    candidates.extend(_read_cni_versions(data, source))

    if not candidates:
        raise ConfigError(f"{source}: missing cniVersion")
    supported = [candidate for candidate in candidates if is_supported(candidate)]
    if not supported:
        raise ConfigError(
            f"{source}: unsupported cniVersion {', '.join(candidates)}: "
            f"supported versions are {', '.join(SUPPORTED_VERSIONS)}"
        )
    return max(supported, key=version_key)


def _read_cni_versions(data: Mapping[str, Any], source: str) -> list[str]:
    versions = data.get("cniVersions", [])
    if not isinstance(versions, list) or not all(isinstance(item, str) for item in versions):
        raise ConfigError(f"{source}: invalid cniVersions {versions!r}: expected a list of strings")
    return list(versions)


def _read_bool(data: Mapping[str, Any], key: str, source: str) -> bool:
    """Read a flag that libcni accepts as a JSON boolean or as "true"/"false"."""
    value = data.get(key, False)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(f"{source}: invalid {key} {value!r}: expected true or false")


def _read_plugins(plugins: Any, source: str) -> tuple[Mapping[str, Any], ...]:
    if not isinstance(plugins, list):
        raise ConfigError(f"{source}: invalid plugins: expected a list of plugin configs")
    if not plugins:
        raise ConfigError(f"{source}: plugins is empty: a network needs at least one plugin")
    return tuple(
        _read_plugin(plugin, source, where=f"plugin {index}")
        for index, plugin in enumerate(plugins)
    )


def _read_plugin(plugin: Any, source: str, where: str) -> Mapping[str, Any]:
    """Check one plugin config and return a read-only deep copy of it."""
    if not isinstance(plugin, Mapping):
        raise ConfigError(f"{source}: {where}: expected a JSON object")
    plugin_type = plugin.get("type")
    if not isinstance(plugin_type, str) or not plugin_type:
        raise ConfigError(f"{source}: {where}: missing plugin type")
    if not is_safe_plugin_type(plugin_type):
        raise ConfigError(
            f"{source}: {where}: invalid plugin type {plugin_type!r}: "
            "expected a file name without '/'"
        )
    capabilities = plugin.get("capabilities", {})
    if not isinstance(capabilities, Mapping):
        raise ConfigError(f"{source}: {where}: invalid capabilities: expected a JSON object")
    return MappingProxyType(copy.deepcopy(dict(plugin)))


def is_safe_plugin_type(plugin_type: str) -> bool:
    """Return whether ``plugin_type`` can only name a file directly inside a bin dir."""
    return bool(plugin_type) and "/" not in plugin_type and plugin_type not in (".", "..")
