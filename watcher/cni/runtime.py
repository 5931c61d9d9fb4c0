"""Run a network's plugin list for one container, as libcni's CNIConfig does.

ADD runs the plugins in order and passes each result on as ``prevResult``.
DEL runs them in reverse order. CHECK runs them in order against the stored
ADD result. Every plugin call goes through ``invoke.invoke_plugin``.
"""

from __future__ import annotations

import asyncio
import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from watcher.cni.conf import NetworkConfigList
from watcher.cni.invoke import (
    ERR_INTERNAL,
    PluginRequest,
    find_plugin,
    invoke_plugin,
    version_request,
)
from watcher.cni.result import Result
from watcher.cni.version import (
    LEGACY_PLUGIN_VERSIONS,
    LEGACY_VERSION_ERROR,
    PREV_RESULT_ON_DEL_VERSION,
    at_least,
    parse_plugin_versions,
)
from watcher.errors import (
    CNIError,
    ConfigError,
    InvalidResultError,
    PluginError,
    PluginNotFoundError,
    PluginVersionError,
)

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RuntimeConf:
    """The container side of a plugin call.

    ``netns`` is the path of the container's network namespace. It may be
    empty for DEL only. ``args`` become ``CNI_ARGS``. ``capability_args``
    maps capability names such as ``portMappings`` or ``bandwidth`` to their
    values, and each plugin receives the ones it declares in its
    ``capabilities`` map as ``runtimeConfig``.
    """

    container_id: str
    netns: str
    ifname: str
    args: tuple[tuple[str, str], ...] = ()
    capability_args: Mapping[str, Any] = field(default_factory=dict)


# A plugin file's identity from os.stat: device, inode, size and modification
# time in nanoseconds. A change in any of them means the binary was replaced.
FileIdentity = tuple[int, int, int, int]


@dataclass(frozen=True)
class _ProbedPlugin:
    identity: FileIdentity
    supported: tuple[str, ...]


class CNIRuntime:
    """Attach and detach networks by running their plugins from ``bin_dirs``.

    ``timeout`` is the limit in seconds for each plugin call, not for a
    whole list. The spec versions that each plugin binary supports are
    cached per path until the file changes.
    """

    def __init__(self, bin_dirs: Sequence[Path], timeout: float) -> None:
        if timeout <= 0:
            raise ConfigError(f"invalid CNI plugin timeout {timeout!r}: expected seconds > 0")
        self.bin_dirs = tuple(bin_dirs)
        self.timeout = timeout
        self._probed: dict[Path, _ProbedPlugin] = {}
        self._probe_locks: dict[Path, asyncio.Lock] = {}

    async def preflight(self, net: NetworkConfigList) -> None:
        """Check that every plugin ``net`` needs is installed and supports its cniVersion.

        Looks up the list's plugins and their IPAM plugins in ``bin_dirs``
        and, the first time a binary is used, runs it with
        ``CNI_COMMAND=VERSION`` to read the spec versions it supports. Runs no
        ADD, DEL or CHECK. Raises PluginNotFoundError for a missing binary,
        PluginVersionError for an unsupported version, and PluginError or
        PluginTimeoutError when the VERSION call fails.
        """
        for plugin_type in net.required_plugin_types:
            path = find_plugin(plugin_type, self.bin_dirs, net.name)
            supported = await self._supported_versions(net, plugin_type, path)
            if net.cni_version not in supported:
                raise PluginVersionError(
                    network=net.name,
                    plugin=plugin_type,
                    path=str(path),
                    cni_version=net.cni_version,
                    supported=supported,
                )

    async def _supported_versions(
        self, net: NetworkConfigList, plugin_type: str, path: Path
    ) -> tuple[str, ...]:
        # The lock keeps containers that start together from probing one
        # binary several times.
        async with self._probe_locks.setdefault(path, asyncio.Lock()):
            identity = _file_identity(net, plugin_type, path)
            cached = self._probed.get(path)
            if cached is not None and cached.identity == identity:
                return cached.supported
            supported = await self._probe(net, plugin_type, path)
            self._probed[path] = _ProbedPlugin(identity, supported)
            return supported

    async def _probe(self, net: NetworkConfigList, plugin_type: str, path: Path) -> tuple[str, ...]:
        """Run the plugin with VERSION and return the spec versions it supports."""
        request = version_request(plugin_type, net.name, net.cni_version)
        try:
            output = await invoke_plugin(request, self.bin_dirs, self.timeout)
        except PluginError as err:
            if err.msg == LEGACY_VERSION_ERROR:
                return LEGACY_PLUGIN_VERSIONS
            raise
        try:
            supported = parse_plugin_versions(output)
        except ValueError as err:
            raise PluginError(
                code=ERR_INTERNAL,
                msg=f"invalid VERSION output: {err}",
                plugin=plugin_type,
                command="VERSION",
                network=net.name,
            ) from err
        log.debug(
            "cni.plugin_versions", plugin=plugin_type, path=str(path), supported=list(supported)
        )
        return supported

    async def add_network(self, net: NetworkConfigList, rt: RuntimeConf) -> Result:
        """Run ADD for each plugin in order and return the last plugin's result.

        Each plugin after the first receives the previous result, converted to
        the list's cniVersion, as ``prevResult``. The returned result is in
        the list's cniVersion too. Plugins that succeeded before a failure are
        not undone, so the caller runs ``del_network`` to clean up.

        Runs ``preflight`` first, so a missing binary or an unsupported
        version raises PluginNotFoundError or PluginVersionError before any
        plugin runs ADD. Then raises CNIError, PluginError or
        PluginTimeoutError as ``invoke_plugin`` does. A missing or malformed
        result is a PluginError.
        """
        await self.preflight(net)

        result: Result | None = None
        for plugin in net.plugins:
            prev_result = result.raw if result is not None else None
            config = build_plugin_config(net, plugin, prev_result, rt.capability_args)
            output = await self._invoke("ADD", net, plugin, config, rt)
            result = _parse_add_output(output, net, plugin)

        if result is None:
            # from_dict rejects empty plugin lists, so only a hand-built list gets here.
            raise CNIError(f"network {net.name!r} has no plugins")
        return result

    async def del_network(
        self,
        net: NetworkConfigList,
        rt: RuntimeConf,
        prev_result: Mapping[str, Any] | None,
    ) -> None:
        """Run DEL for each plugin in reverse order.

        ``prev_result`` is the stored ADD result. Lists of version 0.4.0 and
        later pass it to every plugin as ``prevResult``, converted to the
        list's version. An unparseable ``prev_result`` is logged and left out,
        because plugins must complete DEL without it. ``rt.netns`` may be
        empty when the namespace no longer exists. Plugins then still release
        their IPAM leases, but some leave other state behind: bridge 1.1.1
        reads the address for its ipMasq rules from the interface in the
        namespace, so without a namespace those nat rules stay.

        Stops at the first plugin that fails and raises its error, as libcni
        does. DEL of resources that are already gone is the plugins' job to
        accept, so such a call succeeds.
        """
        prev = None
        if prev_result is not None and at_least(net.cni_version, PREV_RESULT_ON_DEL_VERSION):
            prev = _convert_stored_result(prev_result, net, rt)

        for plugin in reversed(net.plugins):
            config = build_plugin_config(net, plugin, prev, rt.capability_args)
            await self._invoke("DEL", net, plugin, config, rt)

    async def check_network(
        self,
        net: NetworkConfigList,
        rt: RuntimeConf,
        prev_result: Mapping[str, Any],
    ) -> None:
        """Run CHECK for each plugin in order against the stored ADD result.

        Does nothing when the list sets ``disableCheck``. Raises CNIError when
        the list's version is older than 0.4.0, which has no CHECK, or when
        ``prev_result`` cannot be parsed, the errors of ``preflight``, and
        the plugin errors as ``invoke_plugin`` does.
        """
        if not at_least(net.cni_version, PREV_RESULT_ON_DEL_VERSION):
            raise CNIError(
                f"network {net.name!r} has cniVersion {net.cni_version}, "
                "and CHECK needs 0.4.0 or later"
            )
        if net.disable_check:
            return
        await self.preflight(net)

        prev = Result.parse(prev_result, net.cni_version).convert(net.cni_version)
        for plugin in net.plugins:
            config = build_plugin_config(net, plugin, prev, rt.capability_args)
            await self._invoke("CHECK", net, plugin, config, rt)

    async def _invoke(
        self,
        command: str,
        net: NetworkConfigList,
        plugin: Mapping[str, Any],
        config: Mapping[str, Any],
        rt: RuntimeConf,
    ) -> dict[str, Any] | None:
        request = PluginRequest(
            command=command,
            network=net.name,
            plugin_type=str(plugin["type"]),
            config=config,
            container_id=rt.container_id,
            netns=rt.netns,
            ifname=rt.ifname,
            args=rt.args,
        )
        return await invoke_plugin(request, self.bin_dirs, self.timeout)


def build_plugin_config(
    net: NetworkConfigList,
    plugin: Mapping[str, Any],
    prev_result: Mapping[str, Any] | None,
    capability_args: Mapping[str, Any],
) -> dict[str, Any]:
    """Return the config that one plugin of ``net`` receives on stdin.

    Sets the list's ``name`` and ``cniVersion``, sets ``prevResult`` when one
    is given, and sets ``runtimeConfig`` to the entries of
    ``capability_args`` whose names the plugin's ``capabilities`` map
    enables. As in libcni, ``runtimeConfig`` is left as written in the plugin
    config when no capability matches.
    """
    config = copy.deepcopy(dict(plugin))
    config["name"] = net.name
    config["cniVersion"] = net.cni_version
    if prev_result is not None:
        config["prevResult"] = copy.deepcopy(dict(prev_result))

    runtime_config = select_capability_args(plugin, capability_args)
    if runtime_config:
        config["runtimeConfig"] = runtime_config
    return config


def select_capability_args(
    plugin: Mapping[str, Any], capability_args: Mapping[str, Any]
) -> dict[str, Any]:
    """Return the capability args whose names the plugin's ``capabilities`` set to true."""
    capabilities = plugin.get("capabilities") or {}
    return {
        name: copy.deepcopy(capability_args[name])
        for name, enabled in capabilities.items()
        if enabled is True and name in capability_args
    }


def _parse_add_output(
    output: Mapping[str, Any] | None, net: NetworkConfigList, plugin: Mapping[str, Any]
) -> Result:
    """Parse an ADD result and convert it to the list's version.

    Raises PluginError with code 999 when the plugin printed no result or a
    result that cannot be parsed or converted.
    """
    if output is None:
        raise _bad_output(net, plugin, "plugin exited 0 but printed no result")
    try:
        parsed = Result.parse(output, net.cni_version)
        return Result.parse(parsed.convert(net.cni_version), net.cni_version)
    except InvalidResultError as err:
        raise _bad_output(net, plugin, str(err)) from err


def _file_identity(net: NetworkConfigList, plugin_type: str, path: Path) -> FileIdentity:
    try:
        stat = os.stat(path)
    except OSError as err:
        raise PluginNotFoundError(
            f"CNI plugin {plugin_type!r} of network {net.name!r} at {path} "
            f"cannot be read: {err.strerror}"
        ) from err
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def _convert_stored_result(
    prev_result: Mapping[str, Any], net: NetworkConfigList, rt: RuntimeConf
) -> dict[str, Any] | None:
    """Return the stored ADD result in the list's version, or None if it is unusable."""
    try:
        return Result.parse(prev_result, net.cni_version).convert(net.cni_version)
    except InvalidResultError as err:
        log.warning(
            "cni.stored_result_unusable",
            network=net.name,
            cni_container_id=rt.container_id,
            error=str(err),
            next_step="running DEL without prevResult",
        )
        return None


def _bad_output(net: NetworkConfigList, plugin: Mapping[str, Any], msg: str) -> PluginError:
    return PluginError(
        code=ERR_INTERNAL,
        msg=msg,
        plugin=str(plugin["type"]),
        command="ADD",
        network=net.name,
    )
