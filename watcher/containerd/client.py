"""Async client for the part of containerd's gRPC API that cni-watcher uses.

Calls go over ``grpc.aio`` to containerd's unix socket. Namespaced calls send
the namespace in the ``containerd-namespace`` metadata key, which is how
containerd scopes a request. Every grpc error is translated by
``translate_rpc_error``: UNAVAILABLE becomes ``ContainerdUnavailable`` and any
other code ``ContainerdError``, except NOT_FOUND on the Get calls, which
return None.
"""

from __future__ import annotations

import asyncio
import enum
import secrets
import types
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Self

import grpc
from google.protobuf import any_pb2, empty_pb2

from watcher.containerd._pb import (
    containers_pb2,
    containers_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    namespaces_pb2,
    namespaces_pb2_grpc,
    tasks_pb2,
    tasks_pb2_grpc,
    version_pb2_grpc,
)
from watcher.containerd._rpc import translate_rpc_error
from watcher.containerd.events import TOPIC_TASK_DELETE, TOPIC_TASK_START, TaskEventStream
from watcher.errors import ContainerdError

NAMESPACE_METADATA_KEY: Final = "containerd-namespace"

# subscribe() publishes an event on <prefix>/<random hex> in MARKER_NAMESPACE
# to learn when its subscription is live. Other subscribers without a topic
# filter, such as `ctr events`, see these events too.
SUBSCRIBED_MARKER_TOPIC_PREFIX: Final = "/cni-watcher/subscribed"
MARKER_NAMESPACE: Final = "default"

# containerd's own Go client raises its receive limit to 16 MiB
# (defaults.DefaultMaxRecvMsgSize). Each listed container carries its OCI spec:
# 2.9 KB for a busybox container made by `ctr run` (measured with containerd
# 1.6.20), several times more with a seccomp profile. By that estimate grpc's
# default limit of 4 MiB can be hit by a List of a few hundred containers.
MAX_RECEIVE_MESSAGE_BYTES: Final = 16 * 1024 * 1024
MAX_RECONNECT_BACKOFF_MS: Final = 5_000


class TaskStatus(enum.Enum):
    """Status of a containerd process, numbered as containerd.v1.types.Status."""

    UNKNOWN = 0
    CREATED = 1
    RUNNING = 2
    STOPPED = 3
    PAUSED = 4
    PAUSING = 5


@dataclass(frozen=True)
class Container:
    """Container metadata record of one namespace."""

    namespace: str
    id: str
    # Excluded from the hash because a mapping is not hashable, but compared by ==.
    labels: Mapping[str, str] = field(hash=False)


@dataclass(frozen=True)
class Task:
    """Init process of a container's task."""

    namespace: str
    container_id: str
    pid: int
    status: TaskStatus


class ContainerdClient:
    """Async client for containerd's gRPC API on a unix socket.

    ``address`` is a socket path or a ``unix://`` URL. ``call_timeout`` is the
    deadline in seconds of each unary call, and the event stream has none. The grpc
    channel is opened on the first call, inside the running event loop.
    """

    def __init__(self, address: str, *, call_timeout: float = 10.0) -> None:
        if call_timeout <= 0:
            raise ValueError(f"call_timeout must be positive, got {call_timeout}")
        self.address = address if "://" in address else f"unix://{address}"
        self.call_timeout = call_timeout
        self._channel: grpc.aio.Channel | None = None
        self._streams: weakref.WeakSet[TaskEventStream] = weakref.WeakSet()
        self._closed = False
        # Stubs are typed Any because mypy does not follow the generated modules.
        self._containers: Any = None
        self._events: Any = None
        self._namespaces: Any = None
        self._tasks: Any = None
        self._version: Any = None

    async def close(self) -> None:
        """Cancel open event streams and close the channel. Calling it again does nothing."""
        self._closed = True
        for stream in list(self._streams):
            stream.cancel()
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def version(self) -> str:
        """Return containerd's version string, for example ``1.6.20~ds1``."""
        self._connect()
        action = f"containerd Version.Version at {self.address}"
        response = await self._unary(self._version.Version, empty_pb2.Empty(), action)
        return str(response.version)

    async def list_namespaces(self) -> list[str]:
        """Return the names of all containerd namespaces, sorted."""
        self._connect()
        action = f"containerd Namespaces.List at {self.address}"
        request = namespaces_pb2.ListNamespacesRequest()
        response = await self._unary(self._namespaces.List, request, action)
        return sorted(str(namespace.name) for namespace in response.namespaces)

    async def get_container(self, namespace: str, container_id: str) -> Container | None:
        """Fetch one container's metadata, or return None when it does not exist."""
        self._connect()
        action = self._describe("Containers.Get", namespace, container_id)
        request = containers_pb2.GetContainerRequest(id=container_id)
        response = await self._unary(
            self._containers.Get, request, action, namespace=namespace, not_found_ok=True
        )
        if response is None:
            return None
        return _container_from_proto(namespace, response.container)

    async def list_containers(self, namespace: str) -> list[Container]:
        """Return every container of a namespace."""
        self._connect()
        action = self._describe("Containers.List", namespace)
        request = containers_pb2.ListContainersRequest()
        response = await self._unary(self._containers.List, request, action, namespace=namespace)
        return [_container_from_proto(namespace, message) for message in response.containers]

    async def get_task(self, namespace: str, container_id: str) -> Task | None:
        """Fetch the init process of a container's task, or return None when it has none."""
        self._connect()
        action = self._describe("Tasks.Get", namespace, container_id)
        request = tasks_pb2.GetRequest(container_id=container_id)
        response = await self._unary(
            self._tasks.Get, request, action, namespace=namespace, not_found_ok=True
        )
        if response is None:
            return None
        return _task_from_proto(namespace, container_id, response.process)

    async def list_tasks(self, namespace: str) -> list[Task]:
        """Return the init process of every task in a namespace."""
        self._connect()
        action = self._describe("Tasks.List", namespace)
        request = tasks_pb2.ListTasksRequest()
        response = await self._unary(self._tasks.List, request, action, namespace=namespace)
        # containerd lists one Process per task, the init process, with id set
        # to the container id. container_id may be empty, so id is the fallback.
        return [
            _task_from_proto(namespace, process.container_id or process.id, process)
            for process in response.tasks
        ]

    async def subscribe(self) -> TaskEventStream:
        """Start an Events.Subscribe call for task start and delete events.

        Returns once containerd has registered the subscription, so every task
        event published after this call returns is delivered. The stream
        carries events of every namespace. Raises ``ContainerdError`` when the
        subscription is not confirmed within ``call_timeout``.
        """
        self._connect()
        action = f"containerd Events.Subscribe at {self.address}"
        marker_topic = f"{SUBSCRIBED_MARKER_TOPIC_PREFIX}/{secrets.token_hex(8)}"
        request = events_pb2.SubscribeRequest(
            filters=[
                f'topic=="{TOPIC_TASK_START}"',
                f'topic=="{TOPIC_TASK_DELETE}"',
                f'topic=="{marker_topic}"',
            ]
        )
        call = self._events.Subscribe(request)
        stream = TaskEventStream(call, address=self.address, marker_topic=marker_topic)
        try:
            async with asyncio.timeout(self.call_timeout):
                await self._confirm_subscription(stream, marker_topic)
        except TimeoutError as error:
            stream.cancel()
            raise ContainerdError(
                f"{action} failed: the subscription was not confirmed within {self.call_timeout} s"
            ) from error
        except BaseException:
            stream.cancel()
            raise
        self._streams.add(stream)
        return stream

    async def _confirm_subscription(self, stream: TaskEventStream, marker_topic: str) -> None:
        """Publish marker events until one of them comes back on the stream.

        grpc.aio's ``wait_for_connection()`` on a server-streaming call returns
        only when the first response arrives, and containerd sends nothing
        until an event matches, so a marker event is the only signal that the
        subscription is live. A marker published before containerd registered
        the subscriber is lost, hence the repeats with a growing interval.
        """
        action = f"containerd Events.Subscribe at {self.address}: Events.Publish of a marker event"
        marker_received = asyncio.ensure_future(stream._wait_for_marker())
        interval = 0.05
        try:
            while True:
                await self._publish_marker(marker_topic, action)
                done, _ = await asyncio.wait({marker_received}, timeout=interval)
                if done:
                    # Raises the translated error if the stream failed.
                    marker_received.result()
                    return
                interval = min(interval * 2, 1.0)
        finally:
            if not marker_received.done():
                marker_received.cancel()
            elif not marker_received.cancelled():
                # Retrieve the exception so asyncio does not log it as unretrieved.
                marker_received.exception()

    async def _publish_marker(self, topic: str, action: str) -> None:
        request = events_pb2.PublishRequest(
            topic=topic,
            event=any_pb2.Any(type_url=empty_pb2.Empty.DESCRIPTOR.full_name),
        )
        await self._unary(self._events.Publish, request, action, namespace=MARKER_NAMESPACE)

    def _connect(self) -> None:
        if self._closed:
            raise RuntimeError(f"ContainerdClient for {self.address} is closed")
        if self._channel is not None:
            return
        channel = grpc.aio.insecure_channel(
            self.address,
            options=[
                ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
                # gRPC's own reconnect backoff grows to 120 s by default, which
                # would keep the channel down long after containerd is back.
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
            ],
        )
        self._containers = containers_pb2_grpc.ContainersStub(channel)
        self._events = events_pb2_grpc.EventsStub(channel)
        self._namespaces = namespaces_pb2_grpc.NamespacesStub(channel)
        self._tasks = tasks_pb2_grpc.TasksStub(channel)
        self._version = version_pb2_grpc.VersionStub(channel)
        self._channel = channel

    def _describe(self, method: str, namespace: str, object_id: str | None = None) -> str:
        if not namespace:
            raise ValueError(f"{method}: namespace must not be empty")
        target = f" of {object_id!r}" if object_id is not None else ""
        return f"containerd {method}{target} in namespace {namespace!r} at {self.address}"

    async def _unary(
        self,
        method: Any,
        request: Any,
        action: str,
        *,
        namespace: str | None = None,
        not_found_ok: bool = False,
    ) -> Any:
        """Run one unary call with the call deadline, returning None on NOT_FOUND if allowed."""
        metadata = ((NAMESPACE_METADATA_KEY, namespace),) if namespace is not None else None
        try:
            return await method(request, timeout=self.call_timeout, metadata=metadata)
        except grpc.aio.AioRpcError as error:
            if not_found_ok and error.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise translate_rpc_error(error, action) from error


def _container_from_proto(namespace: str, message: Any) -> Container:
    return Container(
        namespace=namespace,
        id=str(message.id),
        labels=types.MappingProxyType(dict(message.labels)),
    )


def _task_from_proto(namespace: str, container_id: str, process: Any) -> Task:
    try:
        status = TaskStatus(process.status)
    except ValueError:
        status = TaskStatus.UNKNOWN
    return Task(
        namespace=namespace,
        container_id=container_id,
        pid=int(process.pid),
        status=status,
    )
