"""Attaching and detaching one container: pin, checkpoint, CNI chain, record.

The order of steps is what keeps the host clean. A checkpoint that contains the
full configs is written before any plugin runs, so whatever happens next, a
later DEL finds what to remove. DEL runs against the pinned namespace, so the
plugins can still see the container's interfaces when they clean up.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import structlog

from watcher.checkpoints import Checkpoint, CheckpointStore, NetworkRecord, Phase
from watcher.cni import CNIRuntime, NetworkConfigList, RuntimeConf
from watcher.errors import CNIError, NetnsError
from watcher.netns import NetnsPins, is_host_netns, is_pinned
from watcher.plan import cni_container_id

log = structlog.get_logger(__name__)

# Called after the pin is in place; returns whether the task still runs with
# the pinned PID.
Confirm = Callable[[], Awaitable[bool]]


class TaskGone(Exception):
    """Raised when the task exited or was replaced before its namespace was pinned."""


class Attacher:
    """Runs the attach and detach steps for one container at a time."""

    def __init__(self, cni: CNIRuntime, store: CheckpointStore, pins: NetnsPins) -> None:
        self.cni = cni
        self.store = store
        self.pins = pins

    async def attach(
        self,
        namespace: str,
        container_id: str,
        pid: int,
        networks: tuple[NetworkRecord, ...],
        confirm: Confirm,
        attempt: int = 1,
    ) -> Checkpoint:
        """Pin the task's namespace and run ADD for each network in order.

        Returns the ``attached`` checkpoint. Raises TaskGone when the task is
        no longer running with ``pid``, NetnsError for a host namespace, and
        CNIError when a plugin is missing or does not support its network's
        cniVersion. Nothing is left behind in these cases.

        Raises CNIError when an ADD fails, after removing the networks tried
        so far with DEL, as the CNI spec requires. If that DEL succeeded, the
        pin and checkpoint are gone too. If it failed, the ``attaching``
        checkpoint stays for a later DEL.
        """
        # A plugin that cannot run would fail its DEL in the same way, so it
        # is found before anything on the host changes.
        for record in networks:
            await self.cni.preflight(_network(record))
        netns = await self._pin(namespace, container_id, pid, confirm)

        checkpoint = Checkpoint(
            namespace=namespace,
            container_id=container_id,
            cni_container_id=cni_container_id(namespace, container_id),
            pid=pid,
            netns=str(netns),
            phase=Phase.ATTACHING,
            networks=networks,
        )
        self.store.write(checkpoint)

        results = await self._add_all(checkpoint, attempt)
        attached = checkpoint.with_phase(Phase.ATTACHED, networks=results)
        self.store.write(attached)
        return attached

    async def detach(self, checkpoint: Checkpoint) -> None:
        """Run DEL for every network in reverse order with the stored configs, then forget.

        The pin is removed and the checkpoint deleted only after every DEL
        succeeded; a CNIError leaves the checkpoint in ``detaching``.
        """
        checkpoint = checkpoint.with_phase(Phase.DETACHING)
        self.store.write(checkpoint)

        netns = self._netns_for_del(checkpoint)
        for record in reversed(checkpoint.networks):
            await self._delete(checkpoint, record, netns, log_done=True)

        self.pins.unpin(checkpoint.namespace, checkpoint.container_id)
        self.store.remove(checkpoint.namespace, checkpoint.container_id)

    async def repin(self, checkpoint: Checkpoint, confirm: Confirm) -> Checkpoint:
        """Pin the namespace of the checkpoint's task again if its pin is gone.

        DEL needs the namespace to remove the interfaces and the bridge
        plugin's NAT rules. Returns the checkpoint with the new pin, or
        unchanged when the pin is still mounted or the task no longer runs
        with the checkpoint's PID.
        """
        if is_pinned(self.pins.path(checkpoint.namespace, checkpoint.container_id)):
            return checkpoint
        try:
            netns = await self._pin(
                checkpoint.namespace, checkpoint.container_id, checkpoint.pid, confirm
            )
        except (TaskGone, NetnsError) as exc:
            log.info("netns.repin_skipped", reason=str(exc))
            return checkpoint
        log.warning("netns.repinned", netns=str(netns), pid=checkpoint.pid)
        return replace(checkpoint, netns=str(netns))

    async def _pin(self, namespace: str, container_id: str, pid: int, confirm: Confirm) -> Path:
        try:
            netns = self.pins.pin(namespace, container_id, pid)
        except NetnsError as exc:
            raise TaskGone(str(exc)) from exc

        # The pin refers to whatever namespace PID had at mount time. Only if the
        # task still runs with that PID afterwards is it the task's namespace
        # and not one of a process that reused a freed PID. No checkpoint
        # names the pin yet, so every failure removes it.
        try:
            running = await confirm()
        except BaseException:
            self.pins.unpin(namespace, container_id)
            raise
        if not running:
            self.pins.unpin(namespace, container_id)
            raise TaskGone(f"task is no longer running with pid {pid}")
        if is_host_netns(netns):
            self.pins.unpin(namespace, container_id)
            raise NetnsError(
                "the task shares the host's network namespace (started with host networking); "
                "remove the opt-in label or start it with its own network namespace"
            )
        return netns

    async def _add_all(self, checkpoint: Checkpoint, attempt: int) -> tuple[NetworkRecord, ...]:
        done: list[NetworkRecord] = []
        for record in checkpoint.networks:
            started = time.monotonic()
            try:
                result = await self.cni.add_network(_network(record), _runtime(checkpoint, record))
            except CNIError as exc:
                await self._undo_partial(checkpoint, len(done) + 1, exc)
                raise
            done.append(replace(record, result=result.raw))
            log.info(
                "network.attached",
                network=record.name,
                ifname=record.ifname,
                ip=",".join(result.addresses()),
                duration_ms=_elapsed_ms(started),
                attempt=attempt,
            )
        return tuple(done)

    async def _undo_partial(self, checkpoint: Checkpoint, count: int, cause: CNIError) -> None:
        # DEL the networks that were added plus the one whose ADD failed, which
        # may have created part of its setup before failing.
        netns = self._netns_for_del(checkpoint)
        try:
            for record in reversed(checkpoint.networks[:count]):
                await self._delete(checkpoint, record, netns, log_done=False)
        except CNIError as exc:
            log.error(
                "container.cleanup_failed",
                error=str(exc),
                add_error=str(cause),
                next_step="the attaching checkpoint is kept and DEL is retried later",
            )
            return

        self.pins.unpin(checkpoint.namespace, checkpoint.container_id)
        self.store.remove(checkpoint.namespace, checkpoint.container_id)

    async def _delete(
        self, checkpoint: Checkpoint, record: NetworkRecord, netns: str, log_done: bool
    ) -> None:
        started = time.monotonic()
        await self.cni.del_network(
            _network(record), _runtime(checkpoint, record, netns), record.result
        )
        if log_done:
            log.info(
                "network.detached",
                network=record.name,
                ifname=record.ifname,
                ip=",".join(record.addresses() or []),
                duration_ms=_elapsed_ms(started),
            )

    def _netns_for_del(self, checkpoint: Checkpoint) -> str:
        # After a reboot the pin is gone. DEL with an empty CNI_NETNS still
        # releases IPAM leases, which live on disk.
        if checkpoint.netns and is_pinned(Path(checkpoint.netns)):
            return checkpoint.netns
        log.warning("netns.pin_missing", netns=checkpoint.netns)
        return ""


def _network(record: NetworkRecord) -> NetworkConfigList:
    return NetworkConfigList.from_dict(record.config, source=f"checkpoint of network {record.name}")


def _runtime(
    checkpoint: Checkpoint, record: NetworkRecord, netns: str | None = None
) -> RuntimeConf:
    return RuntimeConf(
        container_id=checkpoint.cni_container_id,
        netns=checkpoint.netns if netns is None else netns,
        ifname=record.ifname,
        args=record.args,
        capability_args=record.capability_args,
    )


def _elapsed_ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
