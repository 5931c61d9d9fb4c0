"""containerd client: task events, container labels and task state over gRPC."""

from watcher.containerd.client import Container, ContainerdClient, Task, TaskStatus
from watcher.containerd.events import TaskEvent, TaskEventStream

__all__ = [
    "Container",
    "ContainerdClient",
    "Task",
    "TaskEvent",
    "TaskEventStream",
    "TaskStatus",
]
