"""Task events from containerd's event stream: the record, the stream and the decoder."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Self

import grpc
import structlog
from google.protobuf.message import DecodeError

from watcher.containerd._pb import task_events_pb2
from watcher.containerd._rpc import translate_rpc_error
from watcher.errors import ContainerdError, ContainerdUnavailable

log = structlog.get_logger(__name__)

TOPIC_TASK_START: Final = "/tasks/start"
TOPIC_TASK_DELETE: Final = "/tasks/delete"

# Event payload message name (the Any type_url without any prefix) -> the
# message class and the topic containerd publishes it on.
_TASK_EVENT_TYPES: Final[Mapping[str, tuple[Any, str]]] = {
    "containerd.events.TaskStart": (task_events_pb2.TaskStart, TOPIC_TASK_START),
    "containerd.events.TaskDelete": (task_events_pb2.TaskDelete, TOPIC_TASK_DELETE),
}


@dataclass(frozen=True)
class TaskEvent:
    """Task start or delete event from containerd's event stream.

    ``exec_id`` is empty for /tasks/start and is ``TaskDelete.id`` for
    /tasks/delete. ``timestamp`` is the envelope's publish time in UTC, or the
    receive time when containerd sent none.
    """

    topic: str
    namespace: str
    container_id: str
    pid: int
    exec_id: str
    timestamp: datetime

    @property
    def is_init(self) -> bool:
        """Whether the event is about the task's init process, not an exec process."""
        return not self.exec_id or self.exec_id == self.container_id


class _UndecodableEvent(Exception):
    """Raised inside this module for an envelope that is skipped, with the reason."""


class TaskEventStream:
    """Async iterator of ``TaskEvent`` from one Events.Subscribe call.

    Iteration raises ``ContainerdUnavailable`` when containerd closes or breaks
    the stream, and ``ContainerdError`` for other grpc errors. After
    ``cancel()`` or ``aclose()`` it ends with StopAsyncIteration. Envelopes of
    another type, or that fail to decode, are logged and skipped.

    grpc.aio cancels the whole call when a task that awaits the next event is
    cancelled, for example by ``asyncio.wait_for``. Iteration then raises
    ``ContainerdError``, and the caller has to subscribe again.
    """

    def __init__(
        self,
        call: grpc.aio.UnaryStreamCall[Any, Any],
        *,
        address: str,
        marker_topic: str,
    ) -> None:
        self._call = call
        self._address = address
        self._marker_topic = marker_topic
        self._cancelled = False
        # Task events received while ContainerdClient.subscribe() waited for
        # its marker event. __anext__ returns them before any newer event.
        self._pending: collections.deque[TaskEvent] = collections.deque()
        self.skipped_count = 0

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> TaskEvent:
        if self._pending:
            return self._pending.popleft()
        while True:
            event = await self._receive()
            if event is not None:
                return event

    def cancel(self) -> None:
        """Cancel the Subscribe call so that iteration ends. Calling it again does nothing."""
        self._cancelled = True
        self._call.cancel()

    async def aclose(self) -> None:
        """Cancel the Subscribe call. This is the async form of ``cancel()``."""
        self.cancel()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _wait_for_marker(self) -> None:
        """Read until a marker event arrives, keeping the task events before it."""
        while True:
            try:
                event = await self._receive()
            except StopAsyncIteration:
                raise ContainerdError(
                    f"containerd Events.Subscribe at {self._address} failed:"
                    " the stream was cancelled before the subscription was confirmed"
                ) from None
            if event is None:
                return
            self._pending.append(event)

    async def _receive(self) -> TaskEvent | None:
        """Read the next task event, or return None for a marker event."""
        while True:
            envelope = await self._read_envelope()
            if envelope.topic == self._marker_topic:
                return None
            try:
                return _decode_task_event(envelope)
            except _UndecodableEvent as error:
                self.skipped_count += 1
                log.warning(
                    "containerd.event_skipped",
                    topic=envelope.topic,
                    namespace=envelope.namespace,
                    type_url=envelope.event.type_url,
                    reason=str(error),
                    skipped_count=self.skipped_count,
                )

    async def _read_envelope(self) -> Any:
        action = f"containerd Events.Subscribe at {self._address}"
        try:
            response = await self._call.read()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            if self._cancelled:
                raise StopAsyncIteration from None
            # The call was cancelled earlier, by a cancelled read or a closed
            # channel, and grpc.aio raises CancelledError for every later read.
            raise ContainerdError(
                f"{action} failed: the call was cancelled. Subscribe again."
            ) from None
        except grpc.aio.AioRpcError as error:
            if self._cancelled and error.code() == grpc.StatusCode.CANCELLED:
                raise StopAsyncIteration from None
            raise translate_rpc_error(error, action) from error

        if response is grpc.aio.EOF:
            if self._cancelled:
                raise StopAsyncIteration
            raise ContainerdUnavailable(
                f"{action} failed: containerd ended the event stream. Subscribe again."
            )
        return response


def _decode_task_event(envelope: Any) -> TaskEvent:
    """Decode a task event envelope, or raise _UndecodableEvent so that it is skipped."""
    type_url = str(envelope.event.type_url)
    # containerd sends the bare message name, but a type.googleapis.com/ style
    # prefix is accepted too.
    type_name = type_url.rsplit("/", 1)[-1]
    known = _TASK_EVENT_TYPES.get(type_name)
    if known is None:
        raise _UndecodableEvent(f"event type {type_name!r} is not a task start or delete")
    message_class, topic = known
    if envelope.topic != topic:
        raise _UndecodableEvent(f"event type {type_name!r} arrived on topic {envelope.topic!r}")

    message = message_class()
    try:
        message.ParseFromString(envelope.event.value)
    except DecodeError as error:
        raise _UndecodableEvent(f"invalid {type_name} payload: {error}") from error
    if not message.container_id:
        raise _UndecodableEvent(f"{type_name} has no container_id")

    if envelope.HasField("timestamp"):
        timestamp = envelope.timestamp.ToDatetime(tzinfo=UTC)
    else:
        timestamp = datetime.now(UTC)
    exec_id = str(message.id) if topic == TOPIC_TASK_DELETE else ""
    return TaskEvent(
        topic=topic,
        namespace=str(envelope.namespace),
        container_id=str(message.container_id),
        pid=int(message.pid),
        exec_id=exec_id,
        timestamp=timestamp,
    )
