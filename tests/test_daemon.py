"""Tests for the daemon's main loop that need no containerd."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from watcher.config import Config, ContainerdSettings, StateSettings
from watcher.daemon import Daemon


def make_daemon(tmp_path: Path) -> Daemon:
    return Daemon(
        Config(
            containerd=ContainerdSettings(address=str(tmp_path / "containerd.sock")),
            state=StateSettings(dir=tmp_path / "state", netns_dir=tmp_path / "netns"),
        )
    )


async def test_failed_watch_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected error in the event watch is logged and ends the run with status 1."""
    daemon = make_daemon(tmp_path)

    async def broken_watch() -> None:
        raise RuntimeError("bug in the event watch")

    monkeypatch.setattr(daemon, "_watch", broken_watch)
    # A daemon that kept waiting for a signal would hang the test without the timeout.
    with capture_logs() as logs:
        async with asyncio.timeout(10):
            status = await daemon.run()

    failed = [entry for entry in logs if entry["event"] == "daemon.failed"]
    assert status == 1
    assert len(failed) == 1
    assert failed[0]["log_level"] == "error"
    assert failed[0]["worker"] == "event watch"
    assert "bug in the event watch" in failed[0]["error"]
    assert [entry["event"] for entry in logs][-1] == "daemon.stopped"
