"""Translation of grpc errors into the project's containerd errors."""

from __future__ import annotations

import grpc

from watcher.errors import ContainerdError, ContainerdUnavailable


def translate_rpc_error(error: grpc.aio.AioRpcError, action: str) -> ContainerdError:
    """Return the error to raise, from the caller, for a failed call described by ``action``.

    UNAVAILABLE becomes ``ContainerdUnavailable``, because containerd is down
    or restarting and a later call may work. Every other code becomes
    ``ContainerdError``.
    """
    code = error.code()
    message = f"{action} failed: {code.name}: {error.details()}"
    if code == grpc.StatusCode.UNAVAILABLE:
        return ContainerdUnavailable(f"{message}. Check that containerd is running, then retry.")
    return ContainerdError(message)
