"""Restart safety: what the daemon does after stops, crashes, containerd restarts and churn.

Each test runs its own daemon (the ``watcher`` fixture), stops or kills it
where the scenario needs that, and ends with the leak check where one applies.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest

from tests.integration.harness import (
    CNI_BIN_DIR,
    REFERENCE_CONF_DIR,
    Daemon,
    WatcherEnv,
    assert_no_leaks,
    bridge_veths,
    container_addresses,
    leases,
    nat_chain,
    nat_rules,
    pins,
    remove_nat_chain,
    unmount_below,
    wait_for,
)
from watcher.attachment import Attacher
from watcher.checkpoints import Checkpoint, CheckpointStore, Phase
from watcher.cni import CNIRuntime
from watcher.config import load_config
from watcher.containerd import ContainerdClient, TaskEvent
from watcher.errors import ContainerdUnavailable
from watcher.netns import NetnsPins
from watcher.reconciler import TASK_DELETE, TASK_START, Reconciler

NETWORKS = {"cni-watcher/networks": "mynet,lo"}
SLOW_PLUGIN = "slowbridge"
# Long enough to stop or kill the daemon while the plugin runs, short enough
# to keep each test within a few seconds.
SLOW_SECONDS = 3

# A wrapper plugin that delays ADD, either before the bridge plugin runs or
# after it has done its work but before the result reaches the daemon, or
# delays DEL before the bridge plugin runs. Other commands go straight to the
# bridge plugin with the same stdin and env.
_SLOW_SCRIPTS = {
    "before": f"""#!/bin/sh
if [ "$CNI_COMMAND" = ADD ]; then sleep {SLOW_SECONDS}; fi
exec {CNI_BIN_DIR}/bridge
""",
    "del": f"""#!/bin/sh
if [ "$CNI_COMMAND" = DEL ]; then sleep {SLOW_SECONDS}; fi
exec {CNI_BIN_DIR}/bridge
""",
    "after": f"""#!/bin/sh
if [ "$CNI_COMMAND" != ADD ]; then exec {CNI_BIN_DIR}/bridge; fi
output=$({CNI_BIN_DIR}/bridge)
status=$?
sleep {SLOW_SECONDS}
printf '%s\\n' "$output"
exit $status
""",
}


@pytest.fixture
def watcher(env: WatcherEnv) -> Iterator[Daemon]:
    """A daemon for ``env``, not started. Afterwards it detaches every container and stops."""
    process = Daemon(env)
    try:
        yield process
    finally:
        _detach_everything(env, process)


def _detach_everything(env: WatcherEnv, process: Daemon) -> None:
    # A test that ends with the daemon stopped may leave attachments behind.
    # Only the daemon can remove their NAT rules, through the pins.
    if process.process is None and not env.checkpoints():
        return
    if process.process is None:
        process.start()
    for namespace, container_id in list(env.containerd.containers):
        env.containerd.remove(namespace, container_id)
    wait_for(lambda: not env.checkpoints(), 30, "the daemon to detach every container")
    process.stop()


def _use_slow_plugin(env: WatcherEnv, when: str) -> None:
    """Route mynet through the slow wrapper plugin, found in a bin dir before the real one."""
    bin_dir = env.base / "slow-bin"
    bin_dir.mkdir()
    script = bin_dir / SLOW_PLUGIN
    script.write_text(_SLOW_SCRIPTS[when])
    script.chmod(0o755)

    network = json.loads((REFERENCE_CONF_DIR / "10-mynet.conf").read_text())
    network["type"] = SLOW_PLUGIN
    env.write_network("10-mynet.conf", network)
    env.bin_dirs = (bin_dir, CNI_BIN_DIR)
    env.write_config()


def _lease_owners(env: WatcherEnv) -> list[str]:
    return sorted(owner.split()[0] for owner in leases(env).values())


def _count(daemon: Daemon, event: str) -> int:
    return sum(1 for line in daemon.logs() if line.get("event") == event)


def _phase(env: WatcherEnv, namespace: str, container_id: str) -> str | None:
    document = env.checkpoint(namespace, container_id)
    return None if document is None else str(document["phase"])


def test_stopped_daemon_catches_up(env: WatcherEnv, watcher: Daemon) -> None:
    """A delete and a start that happen while the daemon is stopped are handled after restart."""
    watcher.start()
    env.containerd.start_container("example", "old", NETWORKS)
    env.wait_attached("example", "old")
    assert watcher.stop() == 0

    env.containerd.remove("example", "old")
    pid = env.containerd.start_container("example", "new", NETWORKS)
    assert env.checkpoint("example", "old") is not None
    assert env.checkpoint("example", "new") is None

    watcher.start()
    env.wait_detached("example", "old")
    env.wait_attached("example", "new")

    assert _lease_owners(env) == ["example--new"]
    assert not any(nat_chain("mynet", "example--old") in rule for rule in nat_rules())
    assert any(nat_chain("mynet", "example--new") in rule for rule in nat_rules())
    assert len(bridge_veths()) == 1
    assert len(pins(env)) == 1
    assert len(container_addresses(pid)) == 1
    assert watcher.errors() == []

    env.containerd.remove("example", "new")
    env.wait_detached("example", "new")
    assert_no_leaks(env, ["example--old", "example--new"])


def test_containerd_restart_keeps_attachments(env: WatcherEnv, watcher: Daemon) -> None:
    """Attachments survive a containerd restart, and the daemon reconnects and attaches again."""
    watcher.start()
    pid = env.containerd.start_container("example", "web", NETWORKS)
    before = env.wait_attached("example", "web")
    addresses = container_addresses(pid)
    owned = leases(env)

    env.containerd.stop()
    try:
        watcher.wait_for_log("containerd.disconnected", timeout=15)
    finally:
        env.containerd.start()
    wait_for(lambda: _count(watcher, "daemon.ready") == 2, 40, "the daemon to reconnect")

    assert _count(watcher, "containerd.connected") == 2
    assert env.checkpoint("example", "web") == before
    assert container_addresses(pid) == addresses
    assert leases(env) == owned
    assert len(pins(env)) == 1

    later = env.containerd.start_container("example", "later", NETWORKS)
    env.wait_attached("example", "later")
    assert len(container_addresses(later)) == 1
    assert watcher.errors() == []

    env.containerd.remove("example", "web")
    env.containerd.remove("example", "later")
    env.wait_detached("example", "web")
    env.wait_detached("example", "later")
    assert_no_leaks(env, ["example--web", "example--later"])


@pytest.mark.parametrize("when", ["before", "after"])
def test_kill_during_add_recovers(env: WatcherEnv, watcher: Daemon, when: str) -> None:
    """A daemon killed during ADD leaves one lease and one address after restart."""
    _use_slow_plugin(env, when)
    watcher.start()
    pid = env.containerd.start_container("example", "slow", NETWORKS)
    wait_for(lambda: _phase(env, "example", "slow") == "attaching", 10, "ADD to start")
    if when == "after":
        # The bridge plugin has made the veth and taken a lease, and the
        # daemon has not seen its result yet.
        wait_for(lambda: leases(env), 10, "the bridge plugin to take a lease")

    # crash() ends the plugin too, as systemd does with the unit's processes.
    # NOTE: a plugin that outlives the daemon, as without a service manager,
    # can finish its ADD after the restarted daemon's DEL and fail that ADD.
    watcher.crash()
    assert _phase(env, "example", "slow") == "attaching"
    watcher.start()
    env.wait_attached("example", "slow", timeout=30)

    assert _lease_owners(env) == ["example--slow"]
    assert len(container_addresses(pid)) == 1
    assert len(bridge_veths()) == 1
    assert len(pins(env)) == 1
    assert watcher.errors() == []

    env.containerd.remove("example", "slow")
    env.wait_detached("example", "slow")
    assert_no_leaks(env, ["example--slow"])


def test_kill_during_del_recovers(env: WatcherEnv, watcher: Daemon) -> None:
    """A daemon killed during DEL finishes the detach after restart."""
    _use_slow_plugin(env, "del")
    watcher.start()
    env.containerd.start_container("example", "slow", NETWORKS)
    env.wait_attached("example", "slow")
    env.containerd.remove("example", "slow")
    wait_for(lambda: _phase(env, "example", "slow") == "detaching", 10, "DEL to start")

    watcher.crash()
    assert len(pins(env)) == 1
    watcher.start()
    env.wait_detached("example", "slow", timeout=30)

    assert watcher.errors() == []
    assert_no_leaks(env, ["example--slow"])


def test_reboot_releases_leases(env: WatcherEnv, watcher: Daemon) -> None:
    """After the pins and tasks are gone, as after a reboot, the daemon releases the leases."""
    names = ("first", "second")
    cni_ids = [f"example--{name}" for name in names]
    chains = [nat_chain("mynet", cni_id) for cni_id in cni_ids]
    watcher.start()
    for name in names:
        env.containerd.start_container("example", name, NETWORKS)
        env.wait_attached("example", name)
    for chain in chains:
        assert f":{chain} - [0:0]" in nat_rules()
    assert watcher.stop() == 0

    # A reboot empties the tmpfs that holds the pins and ends every task,
    # while checkpoints and host-local leases stay on disk.
    unmount_below(env.netns_dir)
    for name in names:
        env.containerd.remove("example", name)
    assert pins(env) == []

    try:
        watcher.start()
        for name in names:
            env.wait_detached("example", name)
        missing = [line for line in watcher.logs() if line.get("event") == "netns.pin_missing"]

        assert len(missing) == len(names)
        assert leases(env) == {}
        assert env.checkpoints() == []
        assert pins(env) == []
        assert list(env.netns_dir.rglob("*")) == []
        assert bridge_veths() == []
        assert watcher.errors() == []
    finally:
        # Expected leftover: DEL without a namespace cannot tell the bridge
        # plugin which address its NAT rules match, so it keeps them (bridge
        # from containernetworking-plugins 1.1.1). After a real reboot the nat
        # table starts empty unless rules are restored at boot.
        for chain in chains:
            remove_nat_chain(chain)
    assert_no_leaks(env, cni_ids)


CHURN_CONTAINERS = 120
CHURN_THREADS = 8


def _churn_one(env: WatcherEnv, index: int) -> None:
    # Every third container exits at once, every third is deleted right after
    # its start, and the rest are deleted once attached.
    name = f"churn{index}"
    if index % 3 == 0:
        env.containerd.start_container("churn", name, NETWORKS, ("true",))
    else:
        env.containerd.start_container("churn", name, NETWORKS)
    if index % 3 == 2:
        env.wait_attached("churn", name, timeout=60)
    env.containerd.remove("churn", name)


def test_churn_leaves_nothing(env: WatcherEnv, watcher: Daemon) -> None:
    """Many opted-in containers started and deleted in quick succession leave nothing behind."""
    watcher.start()
    with ThreadPoolExecutor(CHURN_THREADS) as pool:
        list(pool.map(lambda index: _churn_one(env, index), range(CHURN_CONTAINERS)))

    wait_for(lambda: not env.checkpoints(), 60, "the daemon to detach every container")
    logs = watcher.logs()
    attached = {line["container_id"] for line in logs if line["event"] == "network.attached"}
    waited = {f"churn{index}" for index in range(CHURN_CONTAINERS) if index % 3 == 2}

    assert waited <= attached
    assert watcher.errors() == []
    assert_no_leaks(env, [f"churn--churn{index}" for index in range(CHURN_CONTAINERS)])


@pytest.fixture
async def reconciler(env: WatcherEnv) -> AsyncIterator[Reconciler]:
    """A Reconciler on the session containerd with the real plugins, without a daemon around it."""
    config = load_config(env.config_path)
    client = ContainerdClient(config.containerd.address)
    store = CheckpointStore(config.state.dir)
    runtime = CNIRuntime(config.cni.bin_dirs, config.cni.plugin_timeout)
    attacher = Attacher(runtime, store, NetnsPins(config.state.netns_dir))
    try:
        yield Reconciler(client, attacher, store, config)
    finally:
        for _, item in store.scan():
            if isinstance(item, Checkpoint):
                await attacher.detach(item)
        await client.close()


def _event(topic: str, container_id: str, pid: int) -> TaskEvent:
    return TaskEvent(
        topic=topic,
        namespace="example",
        container_id=container_id,
        pid=pid,
        exec_id="",
        timestamp=datetime.now(UTC),
    )


async def _feed(reconciler: Reconciler, *events: TaskEvent) -> None:
    for event in events:
        reconciler.submit(event)
    assert await reconciler.drain(30)


async def test_duplicate_start_ignored(env: WatcherEnv, reconciler: Reconciler) -> None:
    """A repeated /tasks/start for the same PID leaves the attachment as it is."""
    pid = env.containerd.start_container("example", "web", NETWORKS)
    await _feed(reconciler, _event(TASK_START, "web", pid))
    before = env.checkpoint("example", "web")
    assert before is not None
    assert before["phase"] == "attached"

    await _feed(reconciler, _event(TASK_START, "web", pid), _event(TASK_START, "web", pid))

    assert env.checkpoint("example", "web") == before
    assert _lease_owners(env) == ["example--web"]
    assert len(container_addresses(pid)) == 1
    assert len(bridge_veths()) == 1


async def test_stale_delete_ignored(env: WatcherEnv, reconciler: Reconciler) -> None:
    """A /tasks/delete whose PID differs from the checkpoint's detaches nothing."""
    pid = env.containerd.start_container("example", "web", NETWORKS)
    await _feed(reconciler, _event(TASK_START, "web", pid))
    before = env.checkpoint("example", "web")

    await _feed(reconciler, _event(TASK_DELETE, "web", pid + 1))

    assert before is not None
    assert env.checkpoint("example", "web") == before
    assert _lease_owners(env) == ["example--web"]
    assert len(container_addresses(pid)) == 1


async def test_new_task_replaces_attachment(env: WatcherEnv, reconciler: Reconciler) -> None:
    """A start with a new PID for the same container detaches the old task and attaches the new."""
    first = env.containerd.start_container("example", "web", NETWORKS)
    await _feed(reconciler, _event(TASK_START, "web", first))
    first_owned = leases(env)
    env.containerd.kill_task("example", "web")
    env.containerd.delete_task("example", "web")
    second = env.containerd.start_task("example", "web")

    # The delete of the first task was missed, so only the new start arrives.
    await _feed(reconciler, _event(TASK_START, "web", second))
    checkpoint = env.checkpoint("example", "web")

    assert checkpoint is not None
    assert checkpoint["phase"] == "attached"
    assert checkpoint["pid"] == second
    assert _lease_owners(env) == ["example--web"]
    assert leases(env).keys().isdisjoint(first_owned.keys())
    assert len(container_addresses(second)) == 1
    assert len(bridge_veths()) == 1
    assert len(pins(env)) == 1

    # The first task's delete arriving late changes nothing.
    await _feed(reconciler, _event(TASK_DELETE, "web", first))
    assert env.checkpoint("example", "web") == checkpoint


async def test_delete_before_attach_leaves_nothing(env: WatcherEnv, reconciler: Reconciler) -> None:
    """A short-lived task deleted before its start is handled ends with nothing attached."""
    pid = env.containerd.start_container("example", "brief", NETWORKS, ("true",))
    env.containerd.delete_task("example", "brief")

    await _feed(reconciler, _event(TASK_START, "brief", pid), _event(TASK_DELETE, "brief", pid))

    assert env.checkpoint("example", "brief") is None
    assert pins(env) == []
    assert leases(env) == {}
    assert bridge_veths() == []
    env.containerd.remove("example", "brief")
    assert_no_leaks(env, ["example--brief"])


def _corrupt_checkpoints() -> dict[str, bytes]:
    """Return checkpoint file contents the daemon cannot use, by container id."""
    valid = {
        "schema": 1,
        "namespace": "example",
        "container_id": "truncated",
        "cni_container_id": "example--truncated",
        "pid": 1,
        "netns": "",
        "phase": "attached",
        "networks": [],
    }
    text = json.dumps(valid, indent=2).encode()
    return {
        "empty": b"",
        "truncated": text[: len(text) // 2],
        "garbage": b"\x00\xffnot json at all",
        "future": json.dumps({**valid, "container_id": "future", "schema": 99}).encode(),
    }


def test_corrupt_checkpoints_quarantined(env: WatcherEnv, watcher: Daemon) -> None:
    """Unreadable checkpoints are renamed .corrupt and logged, and attaching goes on."""
    folder = env.state_dir / "checkpoints" / "example"
    folder.mkdir(parents=True)
    for container_id, content in _corrupt_checkpoints().items():
        (folder / f"{container_id}.json").write_bytes(content)
    # A running opted-in container whose checkpoint is unreadable is attached afresh.
    running = env.containerd.start_container("example", "garbage", NETWORKS)

    watcher.start()
    env.wait_attached("example", "garbage")
    later = env.containerd.start_container("example", "later", NETWORKS)
    env.wait_attached("example", "later")

    errors = watcher.errors()
    paths = sorted(line["path"] for line in errors if line["event"] == "checkpoint.corrupt")
    expected = sorted(str(folder / f"{name}.json") for name in _corrupt_checkpoints())
    assert paths == expected
    assert len(errors) == len(expected)
    for name in _corrupt_checkpoints():
        assert (folder / f"{name}.json.corrupt").is_file()
    assert len(container_addresses(running)) == 1
    assert len(container_addresses(later)) == 1
    assert _lease_owners(env) == ["example--garbage", "example--later"]

    env.containerd.remove("example", "garbage")
    env.containerd.remove("example", "later")
    env.wait_detached("example", "garbage")
    env.wait_detached("example", "later")
    assert_no_leaks(env, ["example--garbage", "example--later"])


def test_partial_write_removed(env: WatcherEnv, watcher: Daemon) -> None:
    """The temporary file of a checkpoint write cut short by a crash is removed at start."""
    folder = env.state_dir / "checkpoints" / "example"
    folder.mkdir(parents=True)
    leftover = folder / ".web.json.k2j4x9q1.tmp"
    leftover.write_text('{"schema": 1, "namesp')

    watcher.start()
    line = watcher.wait_for_log("checkpoint.partial_write_removed")

    assert line["path"] == str(leftover)
    assert not leftover.exists()
    assert watcher.errors() == []


def test_sigterm_lets_add_finish(env: WatcherEnv, watcher: Daemon) -> None:
    """SIGTERM during ADD lets it finish, detaches nothing and exits 0."""
    _use_slow_plugin(env, "before")
    watcher.start()
    pid = env.containerd.start_container("example", "slow", NETWORKS)
    wait_for(lambda: _phase(env, "example", "slow") == "attaching", 10, "ADD to start")

    assert watcher.stop(signal.SIGTERM) == 0
    checkpoint = env.checkpoint("example", "slow")
    logs = watcher.logs()
    stopping = [line for line in logs if line["event"] == "daemon.stopping"]
    stopped = [line for line in logs if line["event"] == "daemon.stopped"]

    assert checkpoint is not None
    assert checkpoint["phase"] == "attached"
    assert len(container_addresses(pid)) == 1
    assert _lease_owners(env) == ["example--slow"]
    assert len(pins(env)) == 1
    assert [line["in_flight"] for line in stopping] == [1]
    assert [line["drained"] for line in stopped] == [True]
    assert not any(line["event"] == "network.detached" for line in logs)
    assert watcher.errors() == []

    # The next start finds the attachment complete and leaves it alone.
    watcher.start()
    env.containerd.start_container("example", "later", NETWORKS)
    env.wait_attached("example", "later", timeout=20)
    assert env.checkpoint("example", "slow") == checkpoint

    env.containerd.remove("example", "later")
    env.containerd.remove("example", "slow")
    env.wait_detached("example", "slow")
    env.wait_detached("example", "later")
    assert_no_leaks(env, ["example--slow", "example--later"])


def test_sigterm_past_shutdown_timeout(env: WatcherEnv, watcher: Daemon) -> None:
    """ADD still running at the shutdown timeout is stopped, and the next start attaches again."""
    _use_slow_plugin(env, "before")
    env.shutdown_timeout = "500ms"
    env.write_config()
    watcher.start()
    pid = env.containerd.start_container("example", "slow", NETWORKS)
    wait_for(lambda: _phase(env, "example", "slow") == "attaching", 10, "ADD to start")

    assert watcher.stop(signal.SIGTERM, timeout=SLOW_SECONDS) == 0
    stopped = [line for line in watcher.logs() if line["event"] == "daemon.stopped"]
    assert [line["drained"] for line in stopped] == [False]
    assert watcher.wait_for_log("container.operation_cancelled")["container_id"] == "slow"
    assert _phase(env, "example", "slow") == "attaching"
    # The wrapper's sleep ends here; had its process outlived the daemon, the
    # bridge plugin would now take a lease.
    time.sleep(SLOW_SECONDS + 1)
    assert leases(env) == {}

    watcher.start()
    env.wait_attached("example", "slow", timeout=30)
    assert _lease_owners(env) == ["example--slow"]
    assert len(container_addresses(pid)) == 1
    assert watcher.errors() == []

    env.containerd.remove("example", "slow")
    env.wait_detached("example", "slow")
    assert_no_leaks(env, ["example--slow"])


def test_hung_containerd_at_start(env: WatcherEnv, watcher: Daemon) -> None:
    """A daemon started while containerd hangs keeps retrying and serves once containerd answers."""
    env.containerd.freeze()
    try:
        watcher.start(wait_ready=False)
        watcher.wait_for_log("containerd.unavailable", timeout=30)
    finally:
        env.containerd.thaw()
    watcher.wait_for_log("daemon.ready", timeout=40)

    pid = env.containerd.start_container("example", "web", NETWORKS)
    env.wait_attached("example", "web")
    assert len(container_addresses(pid)) == 1

    env.containerd.remove("example", "web")
    env.wait_detached("example", "web")
    assert_no_leaks(env, ["example--web"])


def test_hung_containerd_during_resync(env: WatcherEnv, watcher: Daemon) -> None:
    """A periodic resync that times out is logged, and the next one still runs."""
    env.resync_interval = "1s"
    env.write_config()
    watcher.start()
    env.containerd.freeze()
    try:
        watcher.wait_for_log("daemon.resync_failed", timeout=30)
    finally:
        env.containerd.thaw()

    # Only a resync removes the marker of a container that no longer exists.
    # Its PID is above 2**22, the highest pid_max Linux allows, so no process has it.
    ghost = Checkpoint(
        namespace="example",
        container_id="ghost",
        cni_container_id="example--ghost",
        pid=2**22 + 1,
        netns="",
        phase=Phase.FAILED,
        networks=(),
    )
    CheckpointStore(env.state_dir).write(ghost)
    env.wait_detached("example", "ghost", timeout=20)
    pid = env.containerd.start_container("example", "web", NETWORKS)
    env.wait_attached("example", "web")
    assert len(container_addresses(pid)) == 1

    env.containerd.remove("example", "web")
    env.wait_detached("example", "web")
    assert_no_leaks(env, ["example--web"])


async def test_confirm_error_leaves_no_pin(env: WatcherEnv) -> None:
    """An attach whose task check fails with a containerd error removes the pin it made."""
    pid = env.containerd.start_container("example", "web", NETWORKS)
    config = load_config(env.config_path)
    store = CheckpointStore(config.state.dir)
    runtime = CNIRuntime(config.cni.bin_dirs, config.cni.plugin_timeout)
    attacher = Attacher(runtime, store, NetnsPins(config.state.netns_dir))

    async def confirm() -> bool:
        raise ContainerdUnavailable("containerd Tasks.Get failed: UNAVAILABLE")

    with pytest.raises(ContainerdUnavailable):
        await attacher.attach("example", "web", pid, (), confirm)
    assert pins(env) == []
    assert list(env.netns_dir.rglob("*")) == []
    assert env.checkpoints() == []


def test_pin_without_checkpoint_removed(env: WatcherEnv, watcher: Daemon) -> None:
    """A pin that no checkpoint names and whose task is gone, as a crash leaves it, is removed."""
    pid = env.containerd.start_container("example", "web", NETWORKS)
    NetnsPins(env.netns_dir).pin("example", "web", pid)
    env.containerd.remove("example", "web")
    assert len(pins(env)) == 1

    watcher.start()
    wait_for(lambda: not pins(env), 10, "the pin to be removed")

    assert watcher.wait_for_log("netns.pin_removed")["netns"] == str(env.netns_dir / "example/web")
    assert list(env.netns_dir.rglob("*")) == []
    assert watcher.errors() == []


def test_reboot_reused_pid_reattaches(env: WatcherEnv, watcher: Daemon) -> None:
    """A new task that after a reboot has its checkpoint's PID is attached anew."""
    watcher.start()
    env.containerd.start_container("example", "web", NETWORKS)
    env.wait_attached("example", "web")
    assert watcher.stop() == 0

    # Reboot stand-in: the pins, the task and the nat table are gone.
    unmount_below(env.netns_dir)
    env.containerd.kill_task("example", "web")
    env.containerd.delete_task("example", "web")
    remove_nat_chain(nat_chain("mynet", "example--web"))
    pid = env.containerd.start_task("example", "web")
    # PID numbering starts over at boot, so a new task can get the old task's
    # PID. The test makes that happen by writing the new PID into the checkpoint.
    path = env.state_dir / "checkpoints" / "example" / "web.json"
    document = json.loads(path.read_text())
    path.write_text(json.dumps({**document, "pid": pid}))

    watcher.start()
    watcher.wait_for_log("network.attached", timeout=15, container_id="web", network="mynet")
    checkpoint = env.wait_attached("example", "web")

    assert checkpoint["pid"] == pid
    assert len(container_addresses(pid)) == 1
    assert _lease_owners(env) == ["example--web"]
    assert len(pins(env)) == 1
    assert watcher.errors() == []

    env.containerd.remove("example", "web")
    env.wait_detached("example", "web")
    assert_no_leaks(env, ["example--web"])


def test_lost_pins_redo_attachment(env: WatcherEnv, watcher: Daemon) -> None:
    """Pins lost while their tasks run are made again, and DEL then ADD go through them."""
    watcher.start()
    pid = env.containerd.start_container("example", "web", NETWORKS)
    env.wait_attached("example", "web")
    assert watcher.stop() == 0

    # A daemon run in its own mount namespace loses its pins this way.
    unmount_below(env.netns_dir)
    watcher.start()
    watcher.wait_for_log("network.attached", timeout=15, container_id="web", network="mynet")
    env.wait_attached("example", "web")

    assert watcher.wait_for_log("netns.repinned")["pid"] == pid
    assert len(container_addresses(pid)) == 1
    assert _lease_owners(env) == ["example--web"]
    assert len(bridge_veths()) == 1
    assert len(pins(env)) == 1
    assert watcher.errors() == []

    env.containerd.remove("example", "web")
    env.wait_detached("example", "web")
    assert_no_leaks(env, ["example--web"])
