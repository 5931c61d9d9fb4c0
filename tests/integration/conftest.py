"""Fixtures for the integration suite: a private containerd per session, a daemon per test."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import (
    Containerd,
    Daemon,
    WatcherEnv,
    remove_bridge,
    require_prerequisites,
    unmount_below,
    wait_for,
)

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def containerd() -> Iterator[Containerd]:
    """A containerd with its own socket, root and state folders for the whole session."""
    require_prerequisites()
    base = Path(tempfile.mkdtemp(prefix="cniw-containerd-"))
    server = Containerd(base)
    # The bridge plugin turns on IPv4 forwarding for isGateway networks; the
    # host gets its own setting back when the session ends.
    forwarding = IP_FORWARD.read_text()
    server.start()
    try:
        yield server
    finally:
        server.close()
        IP_FORWARD.write_text(forwarding)


@pytest.fixture
def env(containerd: Containerd, tmp_path: Path) -> Iterator[WatcherEnv]:
    """Config, conf dir and state folders for one daemon; the bridge is removed afterwards."""
    environment = WatcherEnv(base=tmp_path, containerd=containerd)
    try:
        yield environment
    finally:
        for namespace, container_id in list(containerd.containers):
            containerd.remove(namespace, container_id)
        unmount_below(tmp_path)
        remove_bridge()


@pytest.fixture
def daemon(env: WatcherEnv) -> Iterator[Daemon]:
    """A running cni-watcher daemon for ``env``, stopped with SIGTERM afterwards."""
    process = Daemon(env)
    process.start()
    try:
        yield process
    finally:
        # Delete the test's containers while the daemon still runs, so it
        # detaches them. A leak check inside the test has already failed if
        # that did not work.
        if process.process is not None:
            try:
                for namespace, container_id in list(env.containerd.containers):
                    env.containerd.remove(namespace, container_id)
                wait_for(lambda: not env.checkpoints(), 20, "the daemon to detach every container")
            finally:
                process.stop()
