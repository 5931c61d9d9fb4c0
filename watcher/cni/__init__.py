"""The CNI runtime: network configs, plugin results and running plugin lists."""

from watcher.cni.conf import ConfDir, NetworkConfigList, load_conf_dir, load_conf_file
from watcher.cni.invoke import PluginRequest, find_plugin, invoke_plugin
from watcher.cni.result import DNS, Interface, IPConfig, Result, Route
from watcher.cni.runtime import CNIRuntime, RuntimeConf, build_plugin_config
from watcher.cni.version import SUPPORTED_VERSIONS

__all__ = [
    "DNS",
    "SUPPORTED_VERSIONS",
    "CNIRuntime",
    "ConfDir",
    "IPConfig",
    "Interface",
    "NetworkConfigList",
    "PluginRequest",
    "Result",
    "Route",
    "RuntimeConf",
    "build_plugin_config",
    "find_plugin",
    "invoke_plugin",
    "load_conf_dir",
    "load_conf_file",
]
