"""Errors raised by cni-watcher.

Every error the package raises on purpose derives from ``WatcherError``, so
the CLI and the daemon's per-container lanes catch that one class::

    WatcherError
    ├── ConfigError            the config file or a CNI config is invalid
    ├── LabelError             a container's opt-in labels are invalid
    ├── ContainerdError        a containerd API call failed
    │   └── ContainerdUnavailable   containerd is not reachable right now
    ├── CNIError               running a CNI plugin failed
    │   ├── PluginNotFoundError     no plugin binary of that type in bin_dirs
    │   ├── PluginVersionError      the plugin does not support the network's cniVersion
    │   ├── PluginError             the plugin exited non-zero or wrote bad output
    │   ├── PluginTimeoutError      the plugin did not finish before its deadline
    │   └── InvalidResultError      a CNI result cannot be parsed or converted
    ├── NetnsError             pinning or releasing a network namespace failed
    └── CheckpointError        a checkpoint file is unreadable or invalid

Errors from grpc, subprocesses and the file system are translated into these
at the module that calls them and chained with ``raise ... from``.
"""

from __future__ import annotations

# CNI spec error code 11: "Try again later", the only code the spec marks as
# transient.
CNI_TRY_AGAIN_LATER = 11

# Fragments of plugin messages that name a transient condition even though the
# plugin reported a generic code: iptables waiting for the xtables lock, and a
# plugin binary replaced while it was being executed.
TRANSIENT_MESSAGE_FRAGMENTS = (
    "xtables lock",
    "another app is currently holding the xtables lock",
    "resource temporarily unavailable",
    "text file busy",
)


class WatcherError(Exception):
    """Base class of every error that cni-watcher raises on purpose."""


class ConfigError(WatcherError):
    """Raised when the config file or a CNI network config is invalid."""


class LabelError(WatcherError):
    """Raised when a container's opt-in labels cannot be turned into a request."""

    def __init__(self, label: str, value: str, reason: str) -> None:
        super().__init__(f"invalid label {label}={value!r}: {reason}")
        self.label = label
        self.value = value
        self.reason = reason


class ContainerdError(WatcherError):
    """Raised when a containerd API call fails."""


class ContainerdUnavailable(ContainerdError):
    """Raised when containerd cannot be reached; the call may work later."""


class CNIError(WatcherError):
    """Base class of failures while running a CNI plugin."""

    @property
    def transient(self) -> bool:
        """Whether the same call may succeed if tried again later."""
        return False


class PluginNotFoundError(CNIError):
    """Raised when no executable for a plugin type is found in ``bin_dirs``."""


class PluginVersionError(CNIError):
    """Raised when a plugin binary does not support the cniVersion of the network that uses it.

    The runtime raises it before any plugin of the network runs ADD.
    """

    def __init__(
        self, *, network: str, plugin: str, path: str, cni_version: str, supported: tuple[str, ...]
    ) -> None:
        super().__init__(
            f"network {network!r} has cniVersion {cni_version}, but CNI plugin {plugin!r} "
            f"at {path} supports only {', '.join(supported)}: set the network's cniVersion "
            f"to one of those, or install a {plugin} plugin that supports {cni_version}"
        )
        self.network = network
        self.plugin = plugin
        self.path = path
        self.cni_version = cni_version
        self.supported = supported


class PluginError(CNIError):
    """Raised when a plugin exits non-zero or writes output that is not valid.

    ``code``, ``msg`` and ``details`` come from the CNI error object that the
    plugin wrote to stdout. A plugin that wrote none gets code 999 and its
    stderr as the message.
    """

    def __init__(
        self,
        *,
        code: int,
        msg: str,
        details: str = "",
        plugin: str,
        command: str,
        network: str,
        stderr: str = "",
    ) -> None:
        text = f"{command} of plugin {plugin!r} in network {network!r} failed: [{code}] {msg}"
        if details:
            text += f" ({details})"
        super().__init__(text)
        self.code = code
        self.msg = msg
        self.details = details
        self.plugin = plugin
        self.command = command
        self.network = network
        self.stderr = stderr

    @property
    def transient(self) -> bool:
        if self.code == CNI_TRY_AGAIN_LATER:
            return True
        text = f"{self.msg} {self.details} {self.stderr}".lower()
        return any(fragment in text for fragment in TRANSIENT_MESSAGE_FRAGMENTS)


class PluginTimeoutError(CNIError):
    """Raised when a plugin is still running at its deadline and was killed."""

    @property
    def transient(self) -> bool:
        return True


class InvalidResultError(CNIError):
    """Raised when a CNI result is malformed or cannot be converted to the requested version."""


class NetnsError(WatcherError):
    """Raised when a network namespace cannot be pinned, checked or released."""


class CheckpointError(WatcherError):
    """Raised when a checkpoint file is unreadable, truncated or of an unknown schema."""
