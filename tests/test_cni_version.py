"""Tests for watcher.cni.version: version comparisons and a plugin's VERSION output."""

from __future__ import annotations

from typing import Any

import pytest

from watcher.cni.version import at_least, parse_plugin_versions, version_key


def test_version_key_orders_numerically() -> None:
    """Versions compare by number, so 0.10.0 comes after 0.4.0."""
    assert version_key("0.10.0") > version_key("0.4.0")
    assert at_least("1.0.0", "0.4.0")
    assert not at_least("0.3.1", "0.4.0")


def test_version_key_rejects_malformed() -> None:
    """A version that is not MAJOR.MINOR.PATCH raises ValueError."""
    with pytest.raises(ValueError, match="MAJOR.MINOR.PATCH"):
        version_key("1.0")


def test_plugin_versions_listed() -> None:
    """supportedVersions is returned in the order the plugin printed it."""
    output = {"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0", "0.3.1"]}

    assert parse_plugin_versions(output) == ("0.4.0", "1.0.0", "0.3.1")


def test_plugin_versions_020_default() -> None:
    """A 0.2.0 output without supportedVersions means 0.1.0 and 0.2.0, as in libcni."""
    assert parse_plugin_versions({"cniVersion": "0.2.0"}) == ("0.1.0", "0.2.0")


@pytest.mark.parametrize(
    ("output", "reason"),
    [
        (None, "printed nothing"),
        ({}, "cniVersion is missing"),
        ({"cniVersion": 1}, "cniVersion is missing"),
        ({"cniVersion": "1.0.0"}, "supportedVersions is missing"),
        ({"cniVersion": "1.0.0", "supportedVersions": []}, "supportedVersions is missing"),
        ({"cniVersion": "1.0.0", "supportedVersions": "1.0.0"}, "not a list of strings"),
        ({"cniVersion": "1.0.0", "supportedVersions": [1]}, "not a list of strings"),
    ],
)
def test_plugin_versions_invalid_output(output: dict[str, Any] | None, reason: str) -> None:
    """Output without a usable cniVersion or supportedVersions raises ValueError."""
    with pytest.raises(ValueError, match=reason):
        parse_plugin_versions(output)
