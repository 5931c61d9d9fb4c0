"""CNI spec versions that cni-watcher understands, and comparisons between them."""

from __future__ import annotations

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
