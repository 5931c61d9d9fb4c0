"""The reconciler: turns task events and containerd listings into attach and detach work.

Work for one container runs in its own lane: operations on the same
(namespace, container id) run one after another in arrival order, while
different containers proceed in parallel up to a bound. Every operation reads
the checkpoint first and acts on the difference between it and what it was
asked for, so duplicate and stale events change nothing.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from watcher.attachment import Attacher, Confirm, TaskGone
from watcher.checkpoints import Checkpoint, CheckpointStore, NetworkRecord, Phase
from watcher.cni import load_conf_dir
from watcher.config import Config
from watcher.containerd import ContainerdClient, Task, TaskEvent, TaskStatus
from watcher.errors import (
    CheckpointError,
    CNIError,
    ContainerdUnavailable,
    LabelError,
    NetnsError,
    PluginError,
    WatcherError,
)
from watcher.health import find_problem, restore_for_del
from watcher.labels import parse_labels
from watcher.netns import is_pin_of
from watcher.plan import cni_container_id, find_port_conflict, plan_networks

log = structlog.get_logger(__name__)

TASK_START = "/tasks/start"
TASK_DELETE = "/tasks/delete"

# The end of a failed plugin's stderr that goes into the error line.
STDERR_LOG_CHARS = 500

ADD_ATTEMPTS = 5
DEL_ATTEMPTS = 5
RETRY_INITIAL_DELAY = 0.5
RETRY_MAX_DELAY = 10.0

# A permanently failed attach is tried again at a resync once this delay has
# passed; it doubles with each failure up to the maximum.
FAILED_RETRY_DELAY = 60.0
FAILED_RETRY_MAX_DELAY = 3600.0

# Task states in which the process exists and keeps its network namespace alive.
LIVE_STATUSES = (TaskStatus.RUNNING, TaskStatus.PAUSED, TaskStatus.PAUSING)


@dataclass(frozen=True)
class ContainerKey:
    """Identifies one container across containerd namespaces."""

    namespace: str
    container_id: str


def is_transient(error: BaseException) -> bool:
    """Return whether ``error`` may go away if the same operation is tried again soon.

    Transient are: containerd being unreachable, a plugin that timed out, and
    a plugin error with CNI code 11 or a message about xtables lock
    contention or a busy binary (see ``CNIError.transient``).
    """
    if isinstance(error, CNIError):
        return error.transient
    return isinstance(error, ContainerdUnavailable)


class Reconciler:
    """Schedules attach and detach operations in per-container lanes."""

    def __init__(
        self,
        client: ContainerdClient,
        attacher: Attacher,
        store: CheckpointStore,
        config: Config,
        max_parallel: int = 16,
    ) -> None:
        self.client = client
        self.attacher = attacher
        self.store = store
        self.config = config
        self._slots = asyncio.Semaphore(max_parallel)
        self._lanes: dict[ContainerKey, asyncio.Lock] = {}
        self._lane_users: dict[ContainerKey, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Failed attaches per container: how many in a row, and the monotonic
        # time before which a resync does not try again.
        self._failures: dict[ContainerKey, tuple[int, float]] = {}
        # Host ports of attaches that passed the conflict check but may not
        # have written their checkpoint yet.
        self._port_claims: dict[ContainerKey, Checkpoint] = {}
        # The last label error logged per container, to log a repeat only at
        # debug level.
        self._label_errors: dict[ContainerKey, str] = {}

    @property
    def in_flight(self) -> int:
        """The number of scheduled operations that have not finished."""
        return len(self._tasks)

    def watches(self, namespace: str) -> bool:
        """Return whether events from containerd ``namespace`` are handled."""
        watched = self.config.containerd.namespaces
        return not watched or namespace in watched

    def submit(self, event: TaskEvent) -> None:
        """Schedule the work that a task event calls for; returns at once."""
        if not self.watches(event.namespace):
            return
        key = ContainerKey(event.namespace, event.container_id)
        if event.topic == TASK_START:
            self._schedule(key, functools.partial(self.ensure_attached, key, event.pid))
        elif event.topic == TASK_DELETE and event.is_init:
            self._schedule(key, functools.partial(self.ensure_detached, key, event.pid))
        elif event.topic == TASK_DELETE:
            log.debug(
                "task.exec_delete_ignored",
                namespace=event.namespace,
                container_id=event.container_id,
                exec_id=event.exec_id,
            )

    async def resync(self) -> None:
        """Compare containerd's tasks with the checkpoints and schedule what differs.

        Running opted-in tasks without an attachment are attached.
        Attachments whose task is gone or was replaced are detached, and pins
        that no checkpoint names are removed.
        """
        checkpoints = self._scan_checkpoints()
        namespaces = await self._namespaces(cp.namespace for cp in checkpoints)
        tasks: dict[ContainerKey, Task] = {}
        for namespace in namespaces:
            for task in await self.client.list_tasks(namespace):
                tasks[ContainerKey(namespace, task.container_id)] = task

        for key in await self._opted_in(namespaces):
            live = tasks.get(key)
            if live is not None and live.status in LIVE_STATUSES:
                work = functools.partial(self.ensure_attached, key, live.pid, check=True)
                self._schedule(key, work)
        for checkpoint in checkpoints:
            key = ContainerKey(checkpoint.namespace, checkpoint.container_id)
            current = tasks.get(key)
            if current is None or current.pid != checkpoint.pid:
                self._schedule(key, functools.partial(self.ensure_detached, key, checkpoint.pid))
        recorded = {ContainerKey(cp.namespace, cp.container_id) for cp in checkpoints}
        for namespace, container_id in self.attacher.pins.scan():
            key = ContainerKey(namespace, container_id)
            if key not in recorded:
                self._schedule(key, functools.partial(self.ensure_unpinned, key))

    async def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for scheduled work, then cancel the rest.

        Returns whether all of the work finished in time.
        """
        pending = set(self._tasks)
        if not pending:
            return True
        _, still_running = await asyncio.wait(pending, timeout=timeout)
        if not still_running:
            return True
        for task in still_running:
            task.cancel()
        # Cancelled work stops and reaps its plugin processes before it ends.
        await asyncio.wait(still_running)
        return False

    async def ensure_attached(self, key: ContainerKey, pid: int, check: bool = False) -> None:
        """Make the container's attachment match a task running with ``pid``.

        With ``check``, an attachment that looks settled is also checked
        inside its namespace, and repaired with DEL then ADD if it is broken.
        """
        checkpoint = self._read_checkpoint(key)
        if checkpoint is not None and checkpoint.pid == pid:
            if self._settled(key, checkpoint):
                if not check or not await self._broken(checkpoint):
                    return
            elif checkpoint.phase != Phase.FAILED:
                checkpoint = await self.attacher.repin(checkpoint, self._confirm(key, pid))
        # An older task's attachment, one interrupted mid-way, or one whose pin
        # does not hold the task's namespace: clean it first.
        if checkpoint is not None and not await self._detach_with_retries(checkpoint):
            return

        records = await self._plan(key)
        if records:
            try:
                await self._attach_with_retries(key, pid, records)
            finally:
                # From here on the checkpoint, if any, shows the ports in use.
                self._port_claims.pop(key, None)

    async def ensure_detached(self, key: ContainerKey, pid: int) -> None:
        """Detach the container if its checkpoint belongs to the task with ``pid``."""
        self._label_errors.pop(key, None)
        checkpoint = self._read_checkpoint(key)
        if checkpoint is None:
            return
        if checkpoint.pid != pid:
            log.debug("task.delete_stale", pid=pid, checkpoint_pid=checkpoint.pid)
            return
        await self._detach_with_retries(checkpoint)

    async def ensure_unpinned(self, key: ContainerKey) -> None:
        """Remove the container's pin if no checkpoint names it.

        Such a pin is left when the daemon dies between pinning a namespace
        and writing the checkpoint. No plugin has run for it then.
        """
        netns = self.attacher.pins.path(key.namespace, key.container_id)
        if not netns.exists() or self._read_checkpoint(key) is not None:
            return
        self.attacher.pins.unpin(key.namespace, key.container_id)
        log.warning("netns.pin_removed", netns=str(netns), reason="no checkpoint names it")

    async def _broken(self, checkpoint: Checkpoint) -> bool:
        """Return whether an attached container lost what ADD gave it.

        Interfaces removed by hand are put back with their old addresses
        before DEL, because the bridge and ptp plugins find the NAT rules to
        remove through the addresses on the interface.
        """
        if checkpoint.phase != Phase.ATTACHED:
            return False
        try:
            problem = await find_problem(self.attacher.cni, checkpoint)
            if problem is None:
                return False
            restored = await restore_for_del(checkpoint)
            log.warning(
                "container.check_failed",
                problem=problem,
                restored_for_del=restored,
                next_step="DEL, then ADD",
            )
        except (NetnsError, CNIError) as exc:
            log.warning("container.check_skipped", error=str(exc))
            return False
        return True

    def _settled(self, key: ContainerKey, checkpoint: Checkpoint) -> bool:
        """Return whether the checkpoint of a task running with its PID needs no work."""
        if checkpoint.phase == Phase.FAILED:
            return not self._retry_due(key)
        if checkpoint.phase != Phase.ATTACHED:
            return False
        if is_pin_of(Path(checkpoint.netns), checkpoint.pid):
            return True
        # After a reboot the pin is gone, and a new task may have the old
        # task's PID but a namespace without anything ADD made. A pin of
        # another namespace means that a new task reused the PID.
        log.warning(
            "checkpoint.stale",
            pid=checkpoint.pid,
            netns=checkpoint.netns,
            reason="the pin is missing or is not of the task's network namespace",
            next_step="DEL, then ADD",
        )
        return False

    def _confirm(self, key: ContainerKey, pid: int) -> Confirm:
        async def confirm() -> bool:
            task = await self.client.get_task(key.namespace, key.container_id)
            return task is not None and task.pid == pid and task.status in LIVE_STATUSES

        return confirm

    async def _plan(self, key: ContainerKey) -> tuple[NetworkRecord, ...]:
        container = await self.client.get_container(key.namespace, key.container_id)
        if container is None:
            return ()
        prefix = self.config.labels.prefix
        request = parse_labels(container.labels, prefix, self.config.cni.default_networks)
        if request is None:
            log.debug("container.not_opted_in")
            return ()

        conf = load_conf_dir(self.config.cni.conf_dir)
        for problem in conf.problems:
            log.warning("cni.config_skipped", reason=problem)
        records = plan_networks(request, conf, prefix)
        self._reserve_ports(key, records, request.labels.get(prefix + "ports", ""))
        return records

    def _reserve_ports(
        self, key: ContainerKey, records: tuple[NetworkRecord, ...], label_value: str
    ) -> None:
        """Claim the planned host ports for ``key`` or raise LabelError if another has them.

        Check and claim run without an await in between, so two lanes cannot
        both pass the check for the same port.
        """
        if not any("portMappings" in record.capability_args for record in records):
            return
        holders = [
            checkpoint
            for _, checkpoint in self.store.scan()
            if isinstance(checkpoint, Checkpoint)
            and ContainerKey(checkpoint.namespace, checkpoint.container_id) != key
            and checkpoint.phase != Phase.FAILED
        ]
        holders += [claim for holder, claim in self._port_claims.items() if holder != key]
        reason = find_port_conflict(records, holders)
        if reason is not None:
            raise LabelError(self.config.labels.prefix + "ports", label_value, reason)
        self._port_claims[key] = Checkpoint(
            namespace=key.namespace,
            container_id=key.container_id,
            cni_container_id=cni_container_id(key.namespace, key.container_id),
            pid=0,
            netns="",
            phase=Phase.ATTACHING,
            networks=records,
        )

    async def _attach_with_retries(
        self, key: ContainerKey, pid: int, records: tuple[NetworkRecord, ...]
    ) -> None:
        confirm = self._confirm(key, pid)
        try:
            async for attempt in _retrying(ADD_ATTEMPTS, "attach"):
                with attempt:
                    number = attempt.retry_state.attempt_number
                    await self._clean_leftover(key)
                    await self.attacher.attach(
                        key.namespace, key.container_id, pid, records, confirm, number
                    )
            self._failures.pop(key, None)
        except TaskGone as exc:
            log.info("container.attach_skipped", reason=f"task exited: {exc}")
        except (CNIError, NetnsError) as exc:
            self._record_failure(key, pid, records, exc)

    async def _clean_leftover(self, key: ContainerKey) -> None:
        # A failed ADD whose cleanup DEL failed too leaves an attaching checkpoint.
        leftover = self._read_checkpoint(key)
        if leftover is not None:
            await self._forget(leftover)

    def _retry_due(self, key: ContainerKey) -> bool:
        _, not_before = self._failures.get(key, (0, 0.0))
        return time.monotonic() >= not_before

    def _record_failure(
        self, key: ContainerKey, pid: int, records: tuple[NetworkRecord, ...], exc: WatcherError
    ) -> None:
        count = self._failures.get(key, (0, 0.0))[0] + 1
        delay = min(FAILED_RETRY_DELAY * 2 ** (count - 1), FAILED_RETRY_MAX_DELAY)
        self._failures[key] = (count, time.monotonic() + delay)
        log.error(
            "container.attach_failed",
            error=str(exc),
            transient=is_transient(exc),
            failures=count,
            next_step=f"tried again at the first resync after {delay:.0f}s",
            **_plugin_fields(exc),
        )
        if self._read_checkpoint(key) is not None:
            return  # the attaching checkpoint stays so a later run of DEL can clean it
        self.store.write(
            Checkpoint(
                namespace=key.namespace,
                container_id=key.container_id,
                cni_container_id=cni_container_id(key.namespace, key.container_id),
                pid=pid,
                netns="",
                phase=Phase.FAILED,
                networks=records,
                error=str(exc),
            )
        )

    async def _detach_with_retries(self, checkpoint: Checkpoint) -> bool:
        try:
            async for attempt in _retrying(DEL_ATTEMPTS, "detach", retry_all=True):
                with attempt:
                    await self._forget(checkpoint)
        except (CNIError, NetnsError) as exc:
            log.error("container.detach_failed", error=str(exc), next_step="retried at next resync")
            return False
        return True

    async def _forget(self, checkpoint: Checkpoint) -> None:
        self._failures.pop(ContainerKey(checkpoint.namespace, checkpoint.container_id), None)
        if checkpoint.phase == Phase.FAILED:
            # A failed ADD was already cleaned with DEL; only the marker is left.
            self.store.remove(checkpoint.namespace, checkpoint.container_id)
            log.info("container.failed_checkpoint_removed", pid=checkpoint.pid)
            return
        await self.attacher.detach(checkpoint)

    def _read_checkpoint(self, key: ContainerKey) -> Checkpoint | None:
        try:
            return self.store.read(key.namespace, key.container_id)
        except CheckpointError as exc:
            self._quarantine(self.store.path(key.namespace, key.container_id), exc)
            return None

    def _scan_checkpoints(self) -> list[Checkpoint]:
        # Writes never await, so no write of this daemon is in progress here.
        for path in self.store.remove_partial_writes():
            log.warning("checkpoint.partial_write_removed", path=str(path))
        checkpoints = []
        for path, item in self.store.scan():
            if isinstance(item, CheckpointError):
                self._quarantine(path, item)
            else:
                checkpoints.append(item)
        return checkpoints

    def _quarantine(self, path: Path, exc: CheckpointError) -> None:
        target = self.store.quarantine(path)
        log.error("checkpoint.corrupt", path=str(path), moved_to=str(target), error=str(exc))

    async def _opted_in(self, namespaces: Iterable[str]) -> list[ContainerKey]:
        prefix = self.config.labels.prefix
        opt_in_labels = (prefix + "networks", prefix + "enabled")
        keys = []
        for namespace in filter(self.watches, namespaces):
            for container in await self.client.list_containers(namespace):
                if any(label in container.labels for label in opt_in_labels):
                    keys.append(ContainerKey(namespace, container.id))
        return keys

    async def _namespaces(self, extra: Iterable[str]) -> list[str]:
        configured = self.config.containerd.namespaces
        listed = list(configured) if configured else await self.client.list_namespaces()
        return sorted(set(listed) | set(extra))

    def _schedule(self, key: ContainerKey, work: Callable[[], Awaitable[None]]) -> None:
        task = asyncio.get_running_loop().create_task(self._run_in_lane(key, work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_in_lane(self, key: ContainerKey, work: Callable[[], Awaitable[None]]) -> None:
        lane = self._lanes.setdefault(key, asyncio.Lock())
        self._lane_users[key] = self._lane_users.get(key, 0) + 1
        try:
            async with lane, self._slots:
                structlog.contextvars.bind_contextvars(
                    namespace=key.namespace, container_id=key.container_id
                )
                await self._run_logged(key, work)
        finally:
            self._lane_users[key] -= 1
            if self._lane_users[key] == 0:
                del self._lane_users[key], self._lanes[key]

    async def _run_logged(self, key: ContainerKey, work: Callable[[], Awaitable[None]]) -> None:
        # The lane is the boundary where errors stop: one container's failure
        # must never stop the daemon from serving the others.
        try:
            await work()
        except asyncio.CancelledError:
            # Only drain() cancels work, when the shutdown wait has run out.
            log.warning("container.operation_cancelled", next_step="finished at the next start")
            raise
        except LabelError as exc:
            self._log_label_error(key, exc)
        except ContainerdUnavailable as exc:
            log.warning("container.deferred", reason=str(exc), next_step="retried at next resync")
        except WatcherError as exc:
            log.error("container.error", error=str(exc))
        except Exception:
            log.exception("container.unexpected_error")

    def _log_label_error(self, key: ContainerKey, exc: LabelError) -> None:
        # Every resync looks at the container again, so a fixed conf dir takes
        # effect without a restart. The same error is logged at error level
        # only the first time.
        level = log.debug if self._label_errors.get(key) == str(exc) else log.error
        self._label_errors[key] = str(exc)
        level(
            "container.label_invalid",
            label=exc.label,
            value=exc.value,
            reason=exc.reason,
            next_step="checked again at every resync",
        )


def _plugin_fields(exc: WatcherError) -> dict[str, object]:
    """Return the CNI error object and the plugin's stderr tail as log fields."""
    if not isinstance(exc, PluginError):
        return {}
    return {
        "plugin": exc.plugin,
        "command": exc.command,
        "network": exc.network,
        "cni_code": exc.code,
        "cni_msg": exc.msg,
        "cni_details": exc.details,
        "stderr": exc.stderr[-STDERR_LOG_CHARS:],
    }


def _retrying(attempts: int, operation: str, retry_all: bool = False) -> AsyncRetrying:
    def log_retry(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            f"container.{operation}_retry",
            attempt=state.attempt_number,
            delay_s=round(delay, 2),
            error=str(error),
        )

    retry_on = (lambda exc: isinstance(exc, WatcherError)) if retry_all else is_transient
    return AsyncRetrying(
        stop=stop_after_attempt(attempts),
        wait=wait_exponential_jitter(multiplier=RETRY_INITIAL_DELAY, max=RETRY_MAX_DELAY),
        retry=retry_if_exception(retry_on),
        before_sleep=log_retry,
        reraise=True,
    )
