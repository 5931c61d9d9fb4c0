"""The daemon's main loop: connect, subscribe, list, watch, reconnect, shut down.

containerd does not replay events, so after every (re)connect the daemon
subscribes first, then lists what exists and reconciles it, and only then
handles the events that arrived meanwhile and later. A periodic resync
catches anything that slipped through.
"""

from __future__ import annotations

import asyncio
import signal

import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter

from watcher import __version__
from watcher.attachment import Attacher
from watcher.checkpoints import CheckpointStore
from watcher.cni import CNIRuntime
from watcher.config import Config, find_setup_problems
from watcher.containerd import ContainerdClient, TaskEventStream
from watcher.errors import ContainerdError
from watcher.netns import NetnsPins
from watcher.reconciler import TASK_DELETE, TASK_START, Reconciler

log = structlog.get_logger(__name__)

RECONNECT_INITIAL_DELAY = 0.5
RECONNECT_MAX_DELAY = 30.0


class Daemon:
    """Keeps one containerd connection alive and feeds its events to the reconciler."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.client = ContainerdClient(config.containerd.address)
        store = CheckpointStore(config.state.dir)
        attacher = Attacher(
            CNIRuntime(config.cni.bin_dirs, config.cni.plugin_timeout),
            store,
            NetnsPins(config.state.netns_dir),
        )
        self.reconciler = Reconciler(
            self.client, attacher, store, config, max_parallel=config.daemon.max_parallel
        )
        self._connected = asyncio.Event()

    async def run(self) -> int:
        """Serve until SIGTERM or SIGINT; returns the exit status.

        The status is 0 after a signal, and 1 when the event watch or the
        periodic resync ended with an unexpected error, so that the service
        manager restarts the daemon instead of leaving it idle.
        """
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        log.info("daemon.started", version=__version__, address=self.config.containerd.address)
        for problem in find_setup_problems(self.config):
            log.warning("daemon.setup_problem", problem=problem)

        workers = [
            asyncio.create_task(self._watch(), name="event watch"),
            asyncio.create_task(self._resync_periodically(), name="periodic resync"),
        ]
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([stopped, *workers], return_when=asyncio.FIRST_COMPLETED)
        status = 0 if stopped.done() else _report_failed(workers)
        stopped.cancel()

        log.info("daemon.stopping", in_flight=self.reconciler.in_flight)
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        finished = await self.reconciler.drain(self.config.daemon.shutdown_timeout)
        await self.client.close()
        log.info("daemon.stopped", drained=finished)
        return status

    async def _watch(self) -> None:
        # Failed connections in a row since the daemon was last ready. Each
        # one doubles the wait before the next, so that a call that always
        # fails does not make a busy loop.
        failures = 0
        while True:
            stream = await self._subscribe()
            try:
                await self.reconciler.resync()
                failures = 0
                log.info("daemon.ready")
                self._connected.set()
                async for event in stream:
                    if event.topic in (TASK_START, TASK_DELETE):
                        self.reconciler.submit(event)
                log.warning("containerd.stream_ended", next_step="reconnecting")
            except ContainerdError as exc:
                failures += 1
                log.warning("containerd.disconnected", error=str(exc), next_step="reconnecting")
            finally:
                self._connected.clear()
                await stream.aclose()
            await asyncio.sleep(_reconnect_delay(failures))

    async def _subscribe(self) -> TaskEventStream:
        retrying = AsyncRetrying(
            # Retry any containerd error, not only UNAVAILABLE, because a
            # containerd that is starting or hung fails calls with a deadline
            # or never confirms the subscription.
            retry=retry_if_exception_type(ContainerdError),
            wait=wait_exponential_jitter(
                multiplier=RECONNECT_INITIAL_DELAY, max=RECONNECT_MAX_DELAY
            ),
            before_sleep=_log_reconnect,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                stream = await self.client.subscribe()
                version = await self.client.version()
                log.info("containerd.connected", containerd_version=version)
                return stream
        raise AssertionError("unreachable: AsyncRetrying without stop returns or raises")

    async def _resync_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.daemon.resync_interval)
            if not self._connected.is_set():
                continue
            try:
                await self.reconciler.resync()
            except ContainerdError as exc:
                log.warning("daemon.resync_failed", error=str(exc), next_step="next interval")


def _reconnect_delay(failures: int) -> float:
    if failures == 0:
        return 0.0
    return min(RECONNECT_INITIAL_DELAY * 2.0 ** (failures - 1), RECONNECT_MAX_DELAY)


def _report_failed(workers: list[asyncio.Task[None]]) -> int:
    for worker in workers:
        if worker.done() and not worker.cancelled():
            error = worker.exception()
            log.error(
                "daemon.failed",
                worker=worker.get_name(),
                error=repr(error),
                exc_info=error,
                next_step="exiting with status 1",
            )
    return 1


def _log_reconnect(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    delay = state.next_action.sleep if state.next_action else 0.0
    log.warning(
        "containerd.unavailable",
        attempt=state.attempt_number,
        delay_s=round(delay, 2),
        error=str(error),
    )
