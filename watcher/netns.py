"""Pinning network namespaces with bind mounts.

A task's network namespace lives only as long as something refers to it. The
daemon bind-mounts ``/proc/PID/ns/net`` onto ``NETNS_DIR/NAMESPACE/ID`` when
it attaches, so the namespace outlives the task's processes. DEL needs that:
the bridge plugin removes its ipMasq NAT rules only when it can still read the
interface addresses inside the namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from pathlib import Path

from watcher.errors import NetnsError

_MS_BIND = 4096
_MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class NetnsPins:
    """Creates, checks and removes network namespace pins below one folder."""

    def __init__(self, netns_dir: Path) -> None:
        self.root = netns_dir

    def path(self, namespace: str, container_id: str) -> Path:
        """Return where the pin of one container's network namespace lives."""
        return self.root / namespace / container_id

    def pin(self, namespace: str, container_id: str, pid: int) -> Path:
        """Bind-mount the network namespace of ``pid`` to the container's pin path.

        An existing pin at that path is replaced. Raises NetnsError when the
        process is gone or the mount fails, after removing the empty pin file
        again. The namespace's folder may stay, empty.
        """
        target = self.path(namespace, container_id)
        if is_pinned(target):
            _unmount(target)
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        target.touch(mode=0o444, exist_ok=True)

        source = f"/proc/{pid}/ns/net"
        if _libc.mount(source.encode(), str(target).encode(), b"none", _MS_BIND, None) != 0:
            errno = ctypes.get_errno()
            target.unlink(missing_ok=True)
            raise NetnsError(f"cannot pin {source} at {target}: {os.strerror(errno)}")
        return target

    def scan(self) -> list[tuple[str, str]]:
        """Return (namespace, container id) of every pin path below the root, mounted or not."""
        return sorted((path.parent.name, path.name) for path in self.root.glob("*/*"))

    def unpin(self, namespace: str, container_id: str) -> None:
        """Unmount and remove the container's pin; a missing pin is not an error."""
        target = self.path(namespace, container_id)
        if is_pinned(target):
            _unmount(target)
        target.unlink(missing_ok=True)
        _remove_empty_dir(target.parent)


def is_pinned(path: Path) -> bool:
    """Return whether ``path`` is a mounted network namespace file."""
    try:
        return os.path.ismount(path) and path.stat().st_dev != path.parent.stat().st_dev
    except OSError:
        return False


def is_pin_of(path: Path, pid: int) -> bool:
    """Return whether ``path`` is a mounted pin of the network namespace of process ``pid``."""
    if not is_pinned(path):
        return False
    try:
        pinned = os.stat(path)
        current = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return False
    return (pinned.st_dev, pinned.st_ino) == (current.st_dev, current.st_ino)


def is_host_netns(path: Path) -> bool:
    """Return whether ``path`` refers to the daemon's own or init's network namespace.

    A container started with the host network shares that namespace; running
    CNI plugins there would reconfigure the host itself.
    """
    pinned = os.stat(path)
    for own in ("/proc/self/ns/net", "/proc/1/ns/net"):
        try:
            host = os.stat(own)
        except PermissionError:
            # Inside some sandboxes init belongs to another user namespace.
            continue
        if (pinned.st_dev, pinned.st_ino) == (host.st_dev, host.st_ino):
            return True
    return False


def _unmount(target: Path) -> None:
    # MNT_DETACH: a plugin that still has the namespace open must not make the
    # unmount fail; the kernel frees the namespace when the last user leaves.
    if _libc.umount2(str(target).encode(), _MNT_DETACH) != 0:
        errno = ctypes.get_errno()
        raise NetnsError(f"cannot unmount netns pin {target}: {os.strerror(errno)}")


def _remove_empty_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()
