"""Tests of watcher.containerd.client against a private containerd.

The integration tests start their own containerd from tests.integration.harness,
with root, state and socket in a temporary folder, run busybox containers in it
with ctr and runc, and remove the containers, the daemon and the folders
afterwards. They need root, containerd, containerd-shim-runc-v2, runc, ctr and
busybox. A missing prerequisite skips them, or fails them when CI=true.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2
from structlog.testing import capture_logs

from tests.integration.harness import (
    Containerd,
    require_prerequisites,
    restore_run_containerd,
    run,
)
from watcher.containerd import (
    Container,
    ContainerdClient,
    Task,
    TaskEvent,
    TaskEventStream,
    TaskStatus,
)
from watcher.containerd._pb import events_pb2, events_pb2_grpc, task_events_pb2
from watcher.errors import ContainerdError, ContainerdUnavailable

# These tests run containers but no CNI plugins, so they need fewer commands
# than the harness's default prerequisites.
PREREQUISITE_COMMANDS = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "busybox")
SLEEP_COMMAND = ("/bin/busybox", "sleep", "600")
EVENT_TIMEOUT_SECONDS = 15.0

ContainerStarter = Callable[[str, str, Mapping[str, str]], None]


def _require_prerequisites() -> None:
    require_prerequisites(commands=PREREQUISITE_COMMANDS, plugins=())


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    _require_prerequisites()
    with restore_run_containerd():
        daemon = Containerd(tmp_path_factory.mktemp("containerd"))
        try:
            daemon.start()
            yield daemon
        finally:
            try:
                daemon.remove_all_containers()
            finally:
                daemon.close()


@pytest.fixture
def namespace() -> str:
    return f"cniwatcher-test-{secrets.token_hex(4)}"


@pytest.fixture
def make_container(containerd: Containerd) -> Iterator[ContainerStarter]:
    """Start detached busybox ``sleep`` containers and remove them after the test."""

    def start(namespace: str, container_id: str, labels: Mapping[str, str]) -> None:
        containerd.start_container(
            namespace,
            container_id,
            labels,
            SLEEP_COMMAND,
            null_io=True,
            runc_root=containerd.base / "runc",
        )

    try:
        yield start
    finally:
        for namespace, container_id in list(containerd.containers):
            containerd.remove(namespace, container_id)


@pytest.fixture
async def client(containerd: Containerd) -> AsyncIterator[ContainerdClient]:
    async with ContainerdClient(containerd.address, call_timeout=10.0) as client:
        yield client


async def _next_event(stream: TaskEventStream, container_id: str, topic: str) -> TaskEvent:
    """Return the first event of ``topic`` about ``container_id``, skipping others."""
    async with asyncio.timeout(EVENT_TIMEOUT_SECONDS):
        async for event in stream:
            if event.container_id == container_id and event.topic == topic:
                return event
    raise AssertionError(f"event stream ended before {topic} of {container_id!r}")


def _publish_request(topic: str, type_url: str, value: bytes) -> events_pb2.PublishRequest:
    return events_pb2.PublishRequest(topic=topic, event=any_pb2.Any(type_url=type_url, value=value))


@pytest.mark.integration
async def test_version_returns_server_version(client: ContainerdClient) -> None:
    """version() returns the version that the containerd binary reports."""
    # `containerd --version` prints: containerd <module> <version> <revision>
    expected = run(["containerd", "--version"]).stdout.split()[2]

    assert await client.version() == expected


@pytest.mark.integration
async def test_get_container_returns_labels(
    client: ContainerdClient, make_container: ContainerStarter, namespace: str
) -> None:
    """get_container() returns the id and labels the container was created with."""
    labels = {"cni.example/networks": "bridge", "other": "x=y"}
    make_container(namespace, "labelled", labels)

    container = await client.get_container(namespace, "labelled")

    assert container == Container(namespace=namespace, id="labelled", labels=labels)


@pytest.mark.integration
async def test_get_container_missing_returns_none(
    client: ContainerdClient, make_container: ContainerStarter, namespace: str
) -> None:
    """get_container() returns None for an id that does not exist."""
    make_container(namespace, "present", {})

    assert await client.get_container(namespace, "absent") is None


@pytest.mark.integration
async def test_list_containers_returns_labels(
    client: ContainerdClient, make_container: ContainerStarter, namespace: str
) -> None:
    """list_containers() returns every container of the namespace with its labels."""
    make_container(namespace, "first", {"role": "a"})
    make_container(namespace, "second", {})

    containers = await client.list_containers(namespace)

    by_id = {container.id: container for container in containers}
    assert sorted(by_id) == ["first", "second"]
    assert by_id["first"].labels == {"role": "a"}
    assert by_id["second"].labels == {}
    assert {container.namespace for container in containers} == {namespace}


@pytest.mark.integration
async def test_get_task_running_returns_pid(
    client: ContainerdClient,
    containerd: Containerd,
    make_container: ContainerStarter,
    namespace: str,
) -> None:
    """get_task() reports a running task with the pid that ctr lists."""
    make_container(namespace, "runner", {})
    expected_pid = containerd.task_pid(namespace, "runner")

    task = await client.get_task(namespace, "runner")

    assert task == Task(
        namespace=namespace, container_id="runner", pid=expected_pid, status=TaskStatus.RUNNING
    )
    assert Path(f"/proc/{expected_pid}/cmdline").read_bytes().split(b"\0")[1] == b"sleep"


@pytest.mark.integration
async def test_get_task_stopped_returns_status(
    client: ContainerdClient,
    containerd: Containerd,
    make_container: ContainerStarter,
    namespace: str,
) -> None:
    """get_task() reports STOPPED for a killed task that is not deleted yet."""
    make_container(namespace, "killed", {})
    containerd.ctr("tasks", "kill", "--signal", "SIGKILL", "killed", namespace=namespace)

    async with asyncio.timeout(EVENT_TIMEOUT_SECONDS):
        while (task := await client.get_task(namespace, "killed")) is not None:
            if task.status is TaskStatus.STOPPED:
                break
            await asyncio.sleep(0.05)

    assert task is not None
    assert task.status is TaskStatus.STOPPED


@pytest.mark.integration
async def test_get_task_without_task_returns_none(
    client: ContainerdClient,
    containerd: Containerd,
    make_container: ContainerStarter,
    namespace: str,
) -> None:
    """get_task() returns None for a missing container and for one whose task was deleted."""
    make_container(namespace, "taskless", {})
    containerd.kill_task_until_stopped(namespace, "taskless")
    containerd.ctr("tasks", "delete", "taskless", namespace=namespace)

    assert await client.get_task(namespace, "absent") is None
    assert await client.get_task(namespace, "taskless") is None
    assert await client.get_container(namespace, "taskless") is not None


@pytest.mark.integration
async def test_list_tasks_returns_init_processes(
    client: ContainerdClient,
    containerd: Containerd,
    make_container: ContainerStarter,
    namespace: str,
) -> None:
    """list_tasks() returns one running task per started container with its pid."""
    make_container(namespace, "one", {})
    make_container(namespace, "two", {})

    tasks = await client.list_tasks(namespace)

    assert sorted(tasks, key=lambda task: task.container_id) == [
        Task(namespace, "one", containerd.task_pid(namespace, "one"), TaskStatus.RUNNING),
        Task(namespace, "two", containerd.task_pid(namespace, "two"), TaskStatus.RUNNING),
    ]


@pytest.mark.integration
async def test_namespaces_are_isolated(
    client: ContainerdClient, make_container: ContainerStarter
) -> None:
    """A container is visible only in the namespace it was created in."""
    suffix = secrets.token_hex(4)
    first, second = f"isolated-a-{suffix}", f"isolated-b-{suffix}"
    make_container(first, "shared-name", {"in": "a"})
    make_container(second, "only-b", {"in": "b"})

    namespaces = await client.list_namespaces()
    assert first in namespaces
    assert second in namespaces

    assert [c.id for c in await client.list_containers(first)] == ["shared-name"]
    assert [c.id for c in await client.list_containers(second)] == ["only-b"]
    assert await client.get_container(second, "shared-name") is None
    assert await client.get_task(second, "shared-name") is None
    assert [t.container_id for t in await client.list_tasks(second)] == ["only-b"]


@pytest.mark.integration
async def test_subscribe_receives_start_and_delete(
    client: ContainerdClient,
    containerd: Containerd,
    make_container: ContainerStarter,
    namespace: str,
) -> None:
    """subscribe() delivers /tasks/start with the pid, then /tasks/delete after kill and delete."""
    async with await client.subscribe() as stream:
        subscribed_at = datetime.now(UTC)
        make_container(namespace, "watched", {})
        pid = containerd.task_pid(namespace, "watched")

        start = await _next_event(stream, "watched", "/tasks/start")

        assert start.namespace == namespace
        assert start.pid == pid
        assert start.exec_id == ""
        assert start.is_init
        assert start.timestamp.tzinfo is UTC
        assert subscribed_at - timedelta(seconds=5) < start.timestamp
        assert start.timestamp < datetime.now(UTC) + timedelta(seconds=5)

        containerd.kill_task_until_stopped(namespace, "watched")
        containerd.ctr("tasks", "delete", "watched", namespace=namespace)
        delete = await _next_event(stream, "watched", "/tasks/delete")

        assert delete.namespace == namespace
        assert delete.pid == pid
        assert delete.is_init
        assert delete.timestamp >= start.timestamp


@pytest.mark.integration
async def test_subscribe_sees_event_right_after_return(
    client: ContainerdClient, containerd: Containerd, namespace: str
) -> None:
    """An event published immediately after subscribe() returns is delivered."""
    payload = task_events_pb2.TaskStart(container_id="right-after", pid=7).SerializeToString()
    async with grpc.aio.insecure_channel(f"unix://{containerd.address}") as channel:
        events = events_pb2_grpc.EventsStub(channel)
        for _ in range(5):
            async with await client.subscribe() as stream:
                await events.Publish(
                    _publish_request("/tasks/start", "containerd.events.TaskStart", payload),
                    metadata=(("containerd-namespace", namespace),),
                )
                event = await _next_event(stream, "right-after", "/tasks/start")
                assert event.pid == 7


@pytest.mark.integration
async def test_subscribe_skips_undecodable_events(
    client: ContainerdClient, containerd: Containerd, namespace: str
) -> None:
    """Events of another type, on another topic or with a corrupt payload are logged and skipped."""
    start = task_events_pb2.TaskStart(container_id="published", pid=42).SerializeToString()
    delete = task_events_pb2.TaskDelete(container_id="published", pid=42).SerializeToString()
    requests = [
        _publish_request("/tasks/start", "google.protobuf.Empty", b""),
        _publish_request("/tasks/start", "containerd.events.TaskDelete", delete),
        _publish_request("/tasks/start", "containerd.events.TaskStart", b"\xff\xff\xff"),
        _publish_request("/tasks/start", "type.googleapis.com/containerd.events.TaskStart", start),
    ]

    async with await client.subscribe() as stream:
        async with grpc.aio.insecure_channel(f"unix://{containerd.address}") as channel:
            events = events_pb2_grpc.EventsStub(channel)
            for request in requests:
                await events.Publish(request, metadata=(("containerd-namespace", namespace),))

        with capture_logs() as logs:
            async with asyncio.timeout(EVENT_TIMEOUT_SECONDS):
                event = await anext(stream)

    assert event.container_id == "published"
    assert event.pid == 42
    assert event.namespace == namespace
    assert stream.skipped_count == 3
    assert [entry["event"] for entry in logs] == ["containerd.event_skipped"] * 3
    assert [entry["log_level"] for entry in logs] == ["warning"] * 3
    assert [entry["type_url"] for entry in logs] == [
        "google.protobuf.Empty",
        "containerd.events.TaskDelete",
        "containerd.events.TaskStart",
    ]
    assert "not a task start or delete" in logs[0]["reason"]
    assert "arrived on topic '/tasks/start'" in logs[1]["reason"]
    assert "invalid containerd.events.TaskStart payload" in logs[2]["reason"]
    assert {entry["topic"] for entry in logs} == {"/tasks/start"}


@pytest.mark.integration
async def test_stream_cancel_ends_iteration(client: ContainerdClient) -> None:
    """cancel() on a stream ends a running async for loop without an error."""
    stream = await client.subscribe()
    received: list[TaskEvent] = []

    async def consume() -> None:
        async for event in stream:
            received.append(event)

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0.1)
    stream.cancel()
    await asyncio.wait_for(consumer, timeout=5)

    assert received == []
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


@pytest.mark.integration
async def test_client_close_ends_open_streams(containerd: Containerd) -> None:
    """close() on the client ends iteration of its open streams."""
    client = ContainerdClient(containerd.address)
    stream = await client.subscribe()

    await client.close()

    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(stream), timeout=5)
    with pytest.raises(RuntimeError, match="is closed"):
        await client.version()


@pytest.mark.integration
async def test_stream_containerd_stop_raises_unavailable(tmp_path: Path) -> None:
    """An open stream raises ContainerdUnavailable when containerd stops."""
    _require_prerequisites()
    with restore_run_containerd():
        daemon = Containerd(tmp_path / "stopping")
        try:
            daemon.start()
            async with ContainerdClient(daemon.address) as client:
                stream = await client.subscribe()
                daemon.stop()

                with pytest.raises(ContainerdUnavailable, match="Events.Subscribe") as raised:
                    await asyncio.wait_for(anext(stream), timeout=EVENT_TIMEOUT_SECONDS)

                assert isinstance(raised.value.__cause__, grpc.aio.AioRpcError)
        finally:
            daemon.close()


async def test_missing_socket_raises_unavailable(tmp_path: Path) -> None:
    """Every call raises ContainerdUnavailable, chained to the grpc error, for a missing socket."""
    socket = tmp_path / "missing.sock"
    async with ContainerdClient(str(socket), call_timeout=5.0) as client:
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "version": client.version,
            "list_namespaces": client.list_namespaces,
            "get_container": lambda: client.get_container("ns", "id"),
            "list_containers": lambda: client.list_containers("ns"),
            "get_task": lambda: client.get_task("ns", "id"),
            "list_tasks": lambda: client.list_tasks("ns"),
            "subscribe": client.subscribe,
        }
        for name, call in calls.items():
            with pytest.raises(ContainerdUnavailable) as raised:
                await call()
            assert str(socket) in str(raised.value), name
            assert isinstance(raised.value.__cause__, grpc.aio.AioRpcError), name


async def test_get_container_error_names_namespace_and_id(tmp_path: Path) -> None:
    """A failed call's message names the method, the namespace and the id."""
    async with ContainerdClient(str(tmp_path / "missing.sock")) as client:
        with pytest.raises(ContainerdError) as raised:
            await client.get_container("team-a", "web-1")

    assert "Containers.Get of 'web-1' in namespace 'team-a'" in str(raised.value)


async def test_empty_namespace_raises_value_error(tmp_path: Path) -> None:
    """A namespaced call with an empty namespace raises ValueError before any RPC."""
    async with ContainerdClient(str(tmp_path / "missing.sock")) as client:
        with pytest.raises(ValueError, match="namespace must not be empty"):
            await client.list_containers("")


def test_client_address_accepts_path_and_url() -> None:
    """A bare socket path gets the unix:// scheme and a URL is kept as given."""
    assert ContainerdClient("/run/c.sock").address == "unix:///run/c.sock"
    assert ContainerdClient("unix:///run/c.sock").address == "unix:///run/c.sock"


def test_client_nonpositive_timeout_raises() -> None:
    """A call_timeout of zero is rejected."""
    with pytest.raises(ValueError, match="call_timeout"):
        ContainerdClient("/run/c.sock", call_timeout=0)


@pytest.mark.parametrize(
    ("container_id", "exec_id", "expected"),
    [
        ("web", "", True),
        ("web", "web", True),
        ("web", "debug-shell", False),
    ],
)
def test_task_event_is_init(container_id: str, exec_id: str, expected: bool) -> None:
    """is_init is False only for an exec id that differs from the container id."""
    event = TaskEvent(
        topic="/tasks/delete",
        namespace="default",
        container_id=container_id,
        pid=1,
        exec_id=exec_id,
        timestamp=datetime.now(UTC),
    )

    assert event.is_init is expected
