"""Run one CNI plugin binary as a supervised subprocess.

This module implements the plugin protocol: the ``CNI_*`` environment, the config
on stdin, the result or error object on stdout, and the exit status. Lists of
plugins are the job of ``runtime.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from watcher.cni.conf import is_safe_plugin_type
from watcher.errors import CNIError, PluginError, PluginNotFoundError, PluginTimeoutError

log = structlog.get_logger(__name__)

# NOTE: without setpriv, plugins run without a parent-death signal and can
# outlive a daemon killed with SIGKILL unless a service manager ends them.
_SETPRIV = shutil.which("setpriv")

# libcni's code for failures that have no CNI error object (types.ErrInternal).
ERR_INTERNAL = 999

# Seconds between SIGTERM and SIGKILL when a plugin is stopped.
DEFAULT_KILL_GRACE = 2.0

# Size limits for stderr in errors: the whole text kept on PluginError.stderr,
# and the tail used as the message when the plugin wrote no error object.
STDERR_KEEP_CHARS = 4096
STDERR_MESSAGE_CHARS = 300

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION")

# CNI_NETNS and CNI_IFNAME of a VERSION call. The command reads neither, but
# plugins built with old versions of the CNI skel package reject a call
# without them, so libcni sends placeholders too.
VERSION_PLACEHOLDER = "dummy"

# Linux limits interface names to IFNAMSIZ - 1 = 15 bytes.
MAX_IFNAME_LENGTH = 15

# libcni's rule for container IDs: an ASCII letter or digit, then letters,
# digits, '_', '.' or '-'.
_CONTAINER_ID_PATTERN = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")


@dataclass(frozen=True)
class PluginRequest:
    """One call of one plugin.

    ``config`` is the complete plugin config sent on stdin, after the runtime
    injected ``name``, ``cniVersion``, ``prevResult`` and ``runtimeConfig``.
    ``args`` become ``CNI_ARGS`` as ``K=V;K=V``.
    """

    command: str
    network: str
    plugin_type: str
    config: Mapping[str, Any]
    container_id: str
    netns: str
    ifname: str
    args: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class _Completed:
    returncode: int
    stdout: bytes
    stderr: bytes
    duration: float


async def invoke_plugin(
    request: PluginRequest,
    bin_dirs: Sequence[Path],
    timeout: float,
    *,
    kill_grace: float = DEFAULT_KILL_GRACE,
) -> dict[str, Any] | None:
    """Run the plugin for ``request`` and return the JSON object it printed.

    Returns None when the plugin exited 0 and printed nothing, which is normal
    for DEL and CHECK. A plugin still running after ``timeout`` seconds, or
    when the calling task is cancelled, gets SIGTERM, then SIGKILL after
    ``kill_grace`` seconds, and is reaped before the error propagates.

    Raises CNIError when the request is invalid, PluginNotFoundError when no
    bin dir has the plugin, PluginTimeoutError on timeout, and PluginError
    when the plugin exits non-zero or prints something that is not a JSON
    object.
    """
    validate_request(request)
    path = find_plugin(request.plugin_type, bin_dirs)

    stdin = json.dumps(request.config).encode()
    env = build_env(request, bin_dirs)

    completed = await _run_supervised(path, stdin, env, request, timeout, kill_grace)

    _log_completed(request, completed)
    return _read_output(completed, request)


def version_request(plugin_type: str, network: str, cni_version: str) -> PluginRequest:
    """Return the VERSION call that requests the spec versions a plugin supports.

    The config on stdin holds only ``cniVersion``. The call has no container.
    """
    return PluginRequest(
        command="VERSION",
        network=network,
        plugin_type=plugin_type,
        config={"cniVersion": cni_version},
        container_id="",
        netns=VERSION_PLACEHOLDER,
        ifname=VERSION_PLACEHOLDER,
    )


def validate_request(request: PluginRequest) -> None:
    """Raise CNIError unless the request's values are safe to pass to a plugin.

    The checks are libcni's: a known command, a container ID of letters,
    digits, '_', '.' and '-', an interface name that Linux accepts, and
    ``CNI_ARGS`` keys and values that the ``K=V;K=V`` form can carry. The
    netns may be empty only for DEL, because after a reboot the namespace is
    gone but the plugins must still release their resources. VERSION has no
    container, so its container ID, netns and interface name are not checked.
    """
    if request.command not in COMMANDS:
        raise CNIError(f"invalid CNI command {request.command!r}: expected one of {COMMANDS}")
    if request.command == "VERSION":
        return
    if not _CONTAINER_ID_PATTERN.match(request.container_id):
        raise CNIError(
            f"invalid container ID {request.container_id!r}: expected a letter or digit, "
            "then letters, digits, '_', '.' or '-'"
        )
    _validate_ifname(request.ifname)
    if not request.netns and request.command != "DEL":
        raise CNIError(f"missing netns path for {request.command}: only DEL may run without one")
    for key, value in request.args:
        if not key or any(char in key for char in "=;") or ";" in value:
            raise CNIError(
                f"invalid CNI_ARGS entry {key!r}={value!r}: keys must be non-empty "
                "without '=' or ';', and values must not contain ';'"
            )


def _validate_ifname(ifname: str) -> None:
    if not ifname or len(ifname.encode()) > MAX_IFNAME_LENGTH:
        raise CNIError(
            f"invalid interface name {ifname!r}: expected 1 to {MAX_IFNAME_LENGTH} bytes"
        )
    if ifname in (".", "..") or any(char in "/:" or char.isspace() for char in ifname):
        raise CNIError(
            f"invalid interface name {ifname!r}: it must not be '.' or '..' "
            "or contain '/', ':' or whitespace"
        )


def find_plugin(plugin_type: str, bin_dirs: Sequence[Path], network: str = "") -> Path:
    """Return the first executable file named ``plugin_type`` in ``bin_dirs``.

    Raises PluginNotFoundError naming the type, the ``network`` that needs it
    when given, and every folder searched.
    """
    if is_safe_plugin_type(plugin_type):
        for bin_dir in bin_dirs:
            candidate = bin_dir / plugin_type
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate

    searched = ", ".join(str(bin_dir) for bin_dir in bin_dirs) or "(no bin dirs configured)"
    of_network = f" of network {network!r}" if network else ""
    raise PluginNotFoundError(
        f"CNI plugin {plugin_type!r}{of_network} not found in {searched}: install it there "
        "or fix the plugin type in the network config"
    )


def format_cni_args(args: Sequence[tuple[str, str]]) -> str:
    """Return ``args`` in the ``CNI_ARGS`` form ``K=V;K=V``."""
    return ";".join(f"{key}={value}" for key, value in args)


def build_env(request: PluginRequest, bin_dirs: Sequence[Path]) -> dict[str, str]:
    """Return the plugin's whole environment: the ``CNI_*`` variables and ``PATH``.

    Nothing else from the daemon's environment reaches the plugin.
    """
    env = {
        "CNI_COMMAND": request.command,
        "CNI_CONTAINERID": request.container_id,
        "CNI_NETNS": request.netns,
        "CNI_IFNAME": request.ifname,
        "CNI_ARGS": format_cni_args(request.args),
        "CNI_PATH": ":".join(str(bin_dir) for bin_dir in bin_dirs),
    }
    if "PATH" in os.environ:
        env["PATH"] = os.environ["PATH"]
    return env


async def _run_supervised(
    path: Path,
    stdin: bytes,
    env: Mapping[str, str],
    request: PluginRequest,
    timeout: float,
    kill_grace: float,
) -> _Completed:
    """Run the plugin to completion, or stop and reap it on timeout or cancellation.

    The plugin runs in a new session, so that its process group, which
    includes helpers it starts such as iptables, can be signalled as a whole.
    """
    started = time.monotonic()
    try:
        process = await asyncio.create_subprocess_exec(
            *_command_line(path),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env),
            start_new_session=True,
        )
    except OSError as err:
        raise _plugin_error(request, ERR_INTERNAL, f"cannot execute {path}: {err}") from err

    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await process.communicate(stdin)
    except TimeoutError:
        await _stop_and_reap(process, kill_grace)
        raise PluginTimeoutError(
            f"{request.command} of plugin {request.plugin_type!r} in network "
            f"{request.network!r} timed out after {timeout:g} s and was killed"
        ) from None
    except BaseException:
        # Cancellation, or an error while talking to the pipes.
        await _stop_and_reap(process, kill_grace)
        raise

    returncode = process.returncode if process.returncode is not None else ERR_INTERNAL
    return _Completed(returncode, stdout, stderr, time.monotonic() - started)


async def _stop_and_reap(process: asyncio.subprocess.Process, kill_grace: float) -> None:
    """Stop the plugin and reap it, even if the calling task is cancelled meanwhile.

    A cancellation that arrives during the stop is raised again once the
    child is reaped.
    """
    stopping = asyncio.ensure_future(_terminate(process, kill_grace))
    cancelled = False
    while not stopping.done():
        try:
            await asyncio.shield(stopping)
        except asyncio.CancelledError:
            cancelled = True
    stopping.result()
    if cancelled:
        raise asyncio.CancelledError


def _command_line(path: Path) -> list[str]:
    # setpriv (util-linux) sets the parent-death signal and then executes the
    # plugin, so the kernel kills a plugin whose daemon was killed. Left
    # running, such a plugin could finish its ADD after the restarted daemon
    # had already cleaned up after it.
    if _SETPRIV is None:
        return [str(path)]
    return [_SETPRIV, "--pdeathsig", "KILL", "--", str(path)]


async def _terminate(process: asyncio.subprocess.Process, kill_grace: float) -> None:
    """Send SIGTERM to the plugin's process group, then SIGKILL after ``kill_grace`` s."""
    _signal_group(process, signal.SIGTERM)
    if await _wait_for_exit(process, kill_grace):
        return

    _signal_group(process, signal.SIGKILL)
    if not await _wait_for_exit(process, kill_grace):
        # The child was reaped but a process outside its group keeps its stdout
        # or stderr open, so asyncio cannot finish the transport.
        log.warning(
            "cni.plugin_pipes_open",
            pid=process.pid,
            returncode=process.returncode,
        )


async def _wait_for_exit(process: asyncio.subprocess.Process, seconds: float) -> bool:
    """Wait up to ``seconds`` for the process to exit and return whether it was reaped."""
    try:
        async with asyncio.timeout(seconds):
            await process.wait()
    except TimeoutError:
        pass
    return process.returncode is not None


def _signal_group(process: asyncio.subprocess.Process, signum: signal.Signals) -> None:
    # The group ID equals the child's PID because of start_new_session. The ID
    # cannot be reused while the child is unreaped, which it is until wait().
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


def _read_output(completed: _Completed, request: PluginRequest) -> dict[str, Any] | None:
    """Return the JSON object on stdout, or raise PluginError for a failed call."""
    if completed.returncode != 0:
        raise _error_from_failed_call(completed, request)

    text = completed.stdout.decode(errors="replace").strip()
    if not text:
        return None
    try:
        output = json.loads(text)
    except json.JSONDecodeError as err:
        raise _plugin_error(
            request, ERR_INTERNAL, f"plugin printed invalid JSON: {err}", completed.stderr
        ) from err
    if not isinstance(output, dict):
        raise _plugin_error(
            request,
            ERR_INTERNAL,
            f"plugin printed a JSON {type(output).__name__}, expected an object",
            completed.stderr,
        )
    return output


def _error_from_failed_call(completed: _Completed, request: PluginRequest) -> PluginError:
    """Build the PluginError for a non-zero exit from the CNI error object on stdout.

    Without a parseable error object the code is 999 and the message is the
    tail of stderr, or the exit status when stderr is empty.
    """
    error_object = _parse_error_object(completed.stdout)
    stderr_text = completed.stderr.decode(errors="replace")
    fallback_msg = _summarize_stderr(stderr_text) or _describe_exit(completed.returncode)
    if error_object is None:
        return _plugin_error(request, ERR_INTERNAL, fallback_msg, completed.stderr)

    code, msg, details = error_object
    return PluginError(
        code=code,
        msg=msg or fallback_msg,
        details=details,
        plugin=request.plugin_type,
        command=request.command,
        network=request.network,
        stderr=stderr_text[-STDERR_KEEP_CHARS:],
    )


def _parse_error_object(stdout: bytes) -> tuple[int, str, str] | None:
    """Return ``code``, ``msg`` and ``details`` of a CNI error object, or None."""
    try:
        data = json.loads(stdout.decode(errors="replace"))
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None

    code = data.get("code")
    if not isinstance(code, int) or isinstance(code, bool):
        return None
    msg = data.get("msg")
    details = data.get("details")
    return code, msg if isinstance(msg, str) else "", details if isinstance(details, str) else ""


def _summarize_stderr(stderr_text: str) -> str:
    """Return the last ``STDERR_MESSAGE_CHARS`` of stderr on one line."""
    one_line = " ".join(stderr_text.split())
    if len(one_line) <= STDERR_MESSAGE_CHARS:
        return one_line
    return "..." + one_line[-STDERR_MESSAGE_CHARS:]


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            signal_name = signal.Signals(-returncode).name
        except ValueError:
            signal_name = f"signal {-returncode}"
        return f"plugin was killed by {signal_name} and wrote no error message"
    return f"plugin exited with status {returncode} and wrote no error message"


def _plugin_error(request: PluginRequest, code: int, msg: str, stderr: bytes = b"") -> PluginError:
    return PluginError(
        code=code,
        msg=msg,
        plugin=request.plugin_type,
        command=request.command,
        network=request.network,
        stderr=stderr.decode(errors="replace")[-STDERR_KEEP_CHARS:],
    )


def _log_completed(request: PluginRequest, completed: _Completed) -> None:
    log.debug(
        "cni.plugin_finished",
        plugin=request.plugin_type,
        command=request.command,
        network=request.network,
        cni_container_id=request.container_id,
        returncode=completed.returncode,
        duration_ms=round(completed.duration * 1000),
        stderr=_summarize_stderr(completed.stderr.decode(errors="replace")),
    )
