"""CNI spec versions that cni-watcher understands, and comparisons between them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SUPPORTED_VERSIONS: tuple[str, ...] = (
    "0.1.0",
    "0.2.0",
    "0.3.0",
    "0.3.1",
    "0.4.0",
    "1.0.0",
    "1.1.0",
)

# The first spec version whose DEL and CHECK receive the ADD result as prevResult.
PREV_RESULT_ON_DEL_VERSION = "0.4.0"


def is_supported(version: str) -> bool:
    """Return whether ``version`` is one of ``SUPPORTED_VERSIONS``."""
    return version in SUPPORTED_VERSIONS


def version_key(version: str) -> tuple[int, int, int]:
    """Return ``version`` as a comparable tuple of three integers.

    Raises ValueError when ``version`` is not of the form ``MAJOR.MINOR.PATCH``.
    """
    parts = version.split(".")
    if len(parts) != 3 or not all(part.isdigit() for part in parts):
        raise ValueError(f"invalid CNI version {version!r}: expected MAJOR.MINOR.PATCH")
    major, minor, patch = (int(part) for part in parts)
    return major, minor, patch


def at_least(version: str, minimum: str) -> bool:
    """Return whether ``version`` is ``minimum`` or later."""
    return version_key(version) >= version_key(minimum)


# libcni's assumption for a plugin that fails VERSION with the error message
# "unknown CNI_COMMAND: VERSION": it predates the command and supports 0.1.0.
LEGACY_VERSION_ERROR = "unknown CNI_COMMAND: VERSION"
LEGACY_PLUGIN_VERSIONS: tuple[str, ...] = ("0.1.0",)


def parse_plugin_versions(output: Mapping[str, Any] | None) -> tuple[str, ...]:
    """Return the spec versions in a plugin's VERSION output, in the order printed.

    The output needs ``cniVersion`` and a non-empty ``supportedVersions`` list,
    except that a 0.2.0 output without the list means 0.1.0 and 0.2.0, as
    libcni decodes it. Raises ValueError naming what is missing or invalid.
    """
    if output is None:
        raise ValueError("the plugin printed nothing")
    version = output.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise ValueError("cniVersion is missing")

    supported = output.get("supportedVersions")
    if not supported and version == "0.2.0":
        return ("0.1.0", "0.2.0")
    if not supported:
        raise ValueError("supportedVersions is missing or empty")
    if not isinstance(supported, list) or not all(isinstance(item, str) for item in supported):
        raise ValueError(f"supportedVersions {supported!r} is not a list of strings")
    return tuple(supported)
