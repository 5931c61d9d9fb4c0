"""Tests for watcher.cni.invoke: running one plugin with a fake plugin script."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cni_fakes import read_records, write_fake_plugin
from watcher.cni.invoke import PluginRequest, find_plugin, invoke_plugin
from watcher.errors import CNIError, PluginError, PluginNotFoundError, PluginTimeoutError

CONFIG = {"cniVersion": "1.0.0", "name": "testnet", "type": "fake"}


def make_request(**changes: Any) -> PluginRequest:
    values: dict[str, Any] = {
        "command": "ADD",
        "network": "testnet",
        "plugin_type": "fake",
        "config": CONFIG,
        "container_id": "c0ffee",
        "netns": "/var/run/netns/cnitest-x",
        "ifname": "eth0",
        "args": (("IgnoreUnknown", "1"), ("K8S_POD_NAME", "web")),
    }
    values.update(changes)
    return PluginRequest(**values)


def assert_process_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    return tmp_path / "bin"


@pytest.fixture
def record(tmp_path: Path) -> Path:
    return tmp_path / "calls.jsonl"


async def test_invoke_success_returns_output(bin_dir: Path, record: Path) -> None:
    """A plugin that exits 0 returns the JSON object it printed."""
    result = {"cniVersion": "1.0.0", "ips": [{"address": "10.98.0.2/24"}]}
    write_fake_plugin(bin_dir, "fake", record, stdout={"ADD": json.dumps(result)})

    output = await invoke_plugin(make_request(), [bin_dir], timeout=10)

    assert output == result


async def test_invoke_empty_stdout_returns_none(bin_dir: Path, record: Path) -> None:
    """A plugin that exits 0 without output returns None."""
    write_fake_plugin(bin_dir, "fake", record, stderr="some debug line\n")

    output = await invoke_plugin(make_request(command="DEL"), [bin_dir], timeout=10)

    assert output is None


async def test_invoke_env_is_cni_vars_and_path(bin_dir: Path, record: Path) -> None:
    """The plugin environment contains only the CNI_* variables and PATH."""
    other_dir = bin_dir.parent / "other"
    write_fake_plugin(bin_dir, "fake", record)

    await invoke_plugin(make_request(), [bin_dir, other_dir], timeout=10)

    env = read_records(record)[0]["env"]
    # Python sets LC_CTYPE itself when it starts under the C locale (PEP 538).
    env.pop("LC_CTYPE", None)
    assert env == {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c0ffee",
        "CNI_NETNS": "/var/run/netns/cnitest-x",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=web",
        "CNI_PATH": f"{bin_dir}:{other_dir}",
        "PATH": os.environ["PATH"],
    }


async def test_invoke_stdin_is_config(bin_dir: Path, record: Path) -> None:
    """The plugin reads the request's config as JSON on stdin."""
    write_fake_plugin(bin_dir, "fake", record)

    await invoke_plugin(make_request(), [bin_dir], timeout=10)

    assert read_records(record)[0]["stdin"] == CONFIG


async def test_invoke_del_allows_empty_netns(bin_dir: Path, record: Path) -> None:
    """DEL runs with an empty CNI_NETNS."""
    write_fake_plugin(bin_dir, "fake", record)

    await invoke_plugin(make_request(command="DEL", netns=""), [bin_dir], timeout=10)

    assert read_records(record)[0]["env"]["CNI_NETNS"] == ""


async def test_invoke_error_object_parsed(bin_dir: Path, record: Path) -> None:
    """A non-zero exit with a CNI error object gives its code, msg and details."""
    error = {"cniVersion": "1.0.0", "code": 7, "msg": "invalid subnet", "details": "10.98/33"}
    write_fake_plugin(
        bin_dir, "fake", record, stdout={"ADD": json.dumps(error)}, stderr="trace\n", exit_code=1
    )

    with pytest.raises(PluginError) as excinfo:
        await invoke_plugin(make_request(), [bin_dir], timeout=10)

    err = excinfo.value
    assert err.code == 7
    assert err.msg == "invalid subnet"
    assert err.details == "10.98/33"
    assert err.plugin == "fake"
    assert err.command == "ADD"
    assert err.network == "testnet"
    assert err.stderr == "trace\n"
    assert not err.transient


async def test_invoke_try_again_later_is_transient(bin_dir: Path, record: Path) -> None:
    """Error code 11 gives a transient PluginError."""
    error = {"code": 11, "msg": "busy"}
    write_fake_plugin(bin_dir, "fake", record, stdout={"ADD": json.dumps(error)}, exit_code=1)

    with pytest.raises(PluginError) as excinfo:
        await invoke_plugin(make_request(), [bin_dir], timeout=10)

    assert excinfo.value.transient


async def test_invoke_no_error_object_uses_stderr(bin_dir: Path, record: Path) -> None:
    """A non-zero exit without an error object gives code 999 and stderr as msg."""
    write_fake_plugin(
        bin_dir, "fake", record, stdout={"ADD": "not json"}, stderr="panic: boom\n", exit_code=2
    )

    with pytest.raises(PluginError) as excinfo:
        await invoke_plugin(make_request(), [bin_dir], timeout=10)

    assert excinfo.value.code == 999
    assert excinfo.value.msg == "panic: boom"
    assert excinfo.value.stderr == "panic: boom\n"


async def test_invoke_long_stderr_shortened(bin_dir: Path, record: Path) -> None:
    """The msg from stderr keeps only its tail."""
    write_fake_plugin(bin_dir, "fake", record, stderr="x" * 5000 + " END", exit_code=1)

    with pytest.raises(PluginError) as excinfo:
        await invoke_plugin(make_request(), [bin_dir], timeout=10)

    assert len(excinfo.value.msg) < 400
    assert excinfo.value.msg.endswith("END")


async def test_invoke_no_output_at_all_names_status(bin_dir: Path, record: Path) -> None:
    """A non-zero exit with empty stdout and stderr names the exit status."""
    write_fake_plugin(bin_dir, "fake", record, exit_code=3)

    with pytest.raises(PluginError) as excinfo:
        await invoke_plugin(make_request(), [bin_dir], timeout=10)

    assert excinfo.value.code == 999
    assert "status 3" in excinfo.value.msg


async def test_invoke_invalid_json_on_success(bin_dir: Path, record: Path) -> None:
    """Exit 0 with output that is not a JSON object raises PluginError 999."""
    write_fake_plugin(bin_dir, "fake", record, stdout={"ADD": "[1, 2]"})

    with pytest.raises(PluginError) as excinfo:
        await invoke_plugin(make_request(), [bin_dir], timeout=10)

    assert excinfo.value.code == 999
    assert "expected an object" in excinfo.value.msg


async def test_invoke_plugin_not_found(tmp_path: Path) -> None:
    """A missing plugin raises PluginNotFoundError naming the type and every bin dir."""
    dirs = [tmp_path / "a", tmp_path / "b"]

    with pytest.raises(PluginNotFoundError) as excinfo:
        await invoke_plugin(make_request(plugin_type="nosuch"), dirs, timeout=10)

    assert "'nosuch'" in str(excinfo.value)
    assert str(dirs[0]) in str(excinfo.value)
    assert str(dirs[1]) in str(excinfo.value)


def test_find_plugin_first_match_wins(tmp_path: Path, record: Path) -> None:
    """The first bin dir with the plugin wins."""
    first = write_fake_plugin(tmp_path / "a", "fake", record)
    write_fake_plugin(tmp_path / "b", "fake", record)

    assert find_plugin("fake", [tmp_path / "missing", tmp_path / "a", tmp_path / "b"]) == first


def test_find_plugin_skips_non_executable(tmp_path: Path, record: Path) -> None:
    """A file without execute permission is not a plugin."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "fake").write_text("#!/bin/sh\n")
    second = write_fake_plugin(tmp_path / "b", "fake", record)

    assert find_plugin("fake", [tmp_path / "a", tmp_path / "b"]) == second


def test_find_plugin_rejects_path_in_type(tmp_path: Path, record: Path) -> None:
    """A type with '/' never resolves outside the bin dirs."""
    write_fake_plugin(tmp_path / "bin", "fake", record)

    with pytest.raises(PluginNotFoundError):
        find_plugin("../bin/fake", [tmp_path / "other"])


async def test_invoke_timeout_kills_child(bin_dir: Path, record: Path) -> None:
    """A plugin past its deadline is killed and reaped, then PluginTimeoutError is raised."""
    write_fake_plugin(bin_dir, "fake", record, sleep=60)

    started = time.monotonic()
    with pytest.raises(PluginTimeoutError) as excinfo:
        await invoke_plugin(make_request(), [bin_dir], timeout=1.0)

    assert time.monotonic() - started < 10
    assert_process_gone(read_records(record)[0]["pid"])
    message = str(excinfo.value)
    assert "ADD" in message
    assert "'fake'" in message
    assert "'testnet'" in message
    assert "1 s" in message
    assert excinfo.value.transient


async def test_invoke_timeout_sigkill_when_sigterm_ignored(bin_dir: Path, record: Path) -> None:
    """A plugin that ignores SIGTERM gets SIGKILL after the grace period."""
    write_fake_plugin(bin_dir, "fake", record, sleep=60, ignore_sigterm=True)

    started = time.monotonic()
    with pytest.raises(PluginTimeoutError):
        await invoke_plugin(make_request(), [bin_dir], timeout=1.0, kill_grace=0.5)

    assert time.monotonic() - started < 10
    assert_process_gone(read_records(record)[0]["pid"])


async def test_invoke_cancel_kills_child(bin_dir: Path, record: Path) -> None:
    """Cancelling the calling task kills and reaps the plugin, then re-raises."""
    write_fake_plugin(bin_dir, "fake", record, sleep=60)
    task = asyncio.create_task(invoke_plugin(make_request(), [bin_dir], timeout=30))
    for _ in range(100):
        if read_records(record):
            break
        await asyncio.sleep(0.05)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert_process_gone(read_records(record)[0]["pid"])


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"container_id": ""}, "invalid container ID"),
        ({"container_id": "-abc"}, "invalid container ID"),
        ({"container_id": "a b"}, "invalid container ID"),
        ({"ifname": ""}, "invalid interface name"),
        ({"ifname": "a" * 16}, "invalid interface name"),
        ({"ifname": "eth/0"}, "invalid interface name"),
        ({"ifname": ".."}, "invalid interface name"),
        ({"ifname": "eth 0"}, "invalid interface name"),
        ({"netns": ""}, "missing netns"),
        ({"args": (("K", "a;b"),)}, "invalid CNI_ARGS"),
        ({"args": (("K=1", "v"),)}, "invalid CNI_ARGS"),
        ({"command": "UP"}, "invalid CNI command"),
    ],
)
async def test_invoke_invalid_request_not_run(
    bin_dir: Path, record: Path, changes: dict[str, Any], reason: str
) -> None:
    """An invalid request raises CNIError before the plugin starts."""
    write_fake_plugin(bin_dir, "fake", record)

    with pytest.raises(CNIError, match=reason):
        await invoke_plugin(make_request(**changes), [bin_dir], timeout=10)

    assert read_records(record) == []


KILLED_RUNTIME = """
import asyncio, sys
from pathlib import Path
from watcher.cni.invoke import PluginRequest, invoke_plugin

request = PluginRequest(
    command="ADD", network="net", plugin_type="fake",
    config={"cniVersion": "1.0.0", "name": "net", "type": "fake"},
    container_id="c0ffee", netns="/proc/self/ns/net", ifname="eth0",
)
asyncio.run(invoke_plugin(request, [Path(sys.argv[1])], timeout=60))
"""


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv from util-linux")
def test_invoke_plugin_dies_with_runtime(bin_dir: Path, record: Path) -> None:
    """A plugin whose runtime process is killed with SIGKILL is killed by the kernel too."""
    write_fake_plugin(bin_dir, "fake", record, sleep=30)
    runtime = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUNTIME, str(bin_dir)], cwd=Path(__file__).parents[1]
    )
    try:
        deadline = time.monotonic() + 10
        while not read_records(record) and time.monotonic() < deadline:
            time.sleep(0.05)
        [call] = read_records(record)
    finally:
        runtime.kill()
        runtime.wait()

    deadline = time.monotonic() + 5
    while _alive(call["pid"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert_process_gone(call["pid"])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
