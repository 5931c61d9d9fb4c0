"""A private containerd, busybox containers, the daemon as a subprocess, and leak checks.

Everything here lives below one temporary folder: containerd's socket, root
and state, the CNI conf dir and IPAM leases, the daemon's checkpoints and
pins. The only host-wide things the tests create are the reference bridge
with its NAT rules and the containers' veths, and the leak checks look for
exactly those.

The bridge is ``cni0`` on 10.22.0.0/16 as in the reference config. Set
CNIW_TEST_BRIDGE and CNIW_TEST_SUBNET to run two suites side by side on one
host without sharing a bridge.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

REPO = Path(__file__).resolve().parents[2]
REFERENCE_CONF_DIR = REPO / "config" / "net.d"
CNI_BIN_DIR = Path("/usr/lib/cni")
REFERENCE_BRIDGE = "cni0"
REFERENCE_SUBNET = "10.22.0.0/16"
BRIDGE = os.environ.get("CNIW_TEST_BRIDGE", REFERENCE_BRIDGE)
SUBNET = ipaddress.ip_network(os.environ.get("CNIW_TEST_SUBNET", REFERENCE_SUBNET))

COMMANDS = (
    "containerd",
    "containerd-shim-runc-v2",
    "runc",
    "ctr",
    "busybox",
    "ip",
    "iptables-save",
    "nsenter",
)
PLUGINS = ("bridge", "host-local", "loopback")
APPLETS = ("sh", "sleep", "httpd", "ip", "true", "cat", "ls")
# containerd 1.6 makes its shim sockets in /run/containerd/s even when its
# config moves root, state and socket elsewhere, and ctr makes stdio FIFOs in
# /run/containerd/fifo.
RUN_CONTAINERD = Path("/run/containerd")

_T = TypeVar("_T")


def require_prerequisites(
    commands: Sequence[str] = COMMANDS, plugins: Sequence[str] = PLUGINS
) -> None:
    """Skip the test when root, a command or a CNI plugin is missing, or fail it when CI=true."""
    missing = [name for name in commands if shutil.which(name) is None]
    missing += [str(CNI_BIN_DIR / name) for name in plugins if not (CNI_BIN_DIR / name).exists()]
    if os.geteuid() != 0:
        missing.append("root privileges")
    if not missing:
        return
    message = (
        f"integration prerequisites missing: {', '.join(missing)}; install containerd, runc, "
        "containernetworking-plugins, iptables and busybox-static and run as root"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def wait_for(predicate: Callable[[], _T], timeout: float = 10.0, what: str = "condition") -> _T:
    """Poll ``predicate`` until it returns a true value, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def run(
    args: Sequence[str], check: bool = True, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run a command and return its output; raise with its stderr when ``check`` and it failed."""
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {result.returncode}: {result.stderr.strip()}"
        )
    return result


def make_rootfs(path: Path) -> Path:
    """Build a minimal busybox root filesystem at ``path``."""
    (path / "bin").mkdir(parents=True)
    for folder in ("proc", "sys", "dev", "etc", "tmp", "www"):
        (path / folder).mkdir()
    shutil.copy2(shutil.which("busybox") or "/bin/busybox", path / "bin" / "busybox")
    for applet in APPLETS:
        (path / "bin" / applet).symlink_to("busybox")
    (path / "www" / "index.html").write_text("hello from a cni-watcher test container\n")
    return path


@contextlib.contextmanager
def restore_run_containerd() -> Iterator[None]:
    """Remove /run/containerd on exit if it did not exist on entry.

    Only empty folders are removed, so whatever another process put there in
    the meantime stays.
    """
    created = not RUN_CONTAINERD.exists()
    try:
        yield
    finally:
        if created:
            # A bottom-up walk removes the subfolders before their parent.
            for folder, _subfolders, _files in os.walk(RUN_CONTAINERD, topdown=False):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)


class Containerd:
    """A containerd with its own socket, root and state folders, ended by PID."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.address = str(base / "containerd.sock")
        self.rootfs = make_rootfs(base / "rootfs")
        self.config = base / "containerd.toml"
        self.log = base / "containerd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.containers: set[tuple[str, str]] = set()

    def start(self) -> None:
        """Start containerd and wait until it serves requests on its socket."""
        # The opt plugin would otherwise create /opt/containerd on the host.
        self.config.write_text(
            "version = 2\n"
            f'root = "{self.base / "root"}"\n'
            f'state = "{self.base / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.address}"\n'
            f'[ttrpc]\n  address = "{self.address}.ttrpc"\n'
            f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{self.base / "opt"}"\n'
        )
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                ["containerd", "--config", str(self.config)], stdout=log, stderr=log
            )
        wait_for(self._serving, 20, "containerd to start")

    def _serving(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise AssertionError(f"containerd exited with {self.process.returncode}:\n{tail}")
        return self.ctr("version", check=False).returncode == 0

    def stop(self) -> None:
        """Stop containerd by PID; running shims and tasks are left alone."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def freeze(self) -> None:
        """Stop containerd with SIGSTOP, so calls to it hang instead of failing."""
        assert self.process is not None, "containerd not started"
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """Let a frozen containerd run again with SIGCONT."""
        assert self.process is not None, "containerd not started"
        self.process.send_signal(signal.SIGCONT)

    def close(self) -> None:
        """Remove every container this harness started, stop containerd and delete its folders."""
        if self.process is not None:
            for namespace, container_id in list(self.containers):
                self.remove(namespace, container_id)
        self.stop()
        unmount_below(self.base)
        shutil.rmtree(self.base, ignore_errors=True)

    def ctr(
        self, *args: str, namespace: str = "default", check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr`` against this containerd."""
        return run(["ctr", "--address", self.address, "--namespace", namespace, *args], check=check)

    def start_container(
        self,
        namespace: str,
        container_id: str,
        labels: Mapping[str, str] | None = None,
        command: Sequence[str] = ("sleep", "3600"),
        *,
        null_io: bool = False,
        runc_root: Path | None = None,
    ) -> int:
        """Start a busybox container in the background and return its task's PID.

        ``null_io`` discards the task's stdio, so ctr makes no FIFOs in
        /run/containerd/fifo. ``runc_root`` moves runc's state out of
        /run/containerd/runc.
        """
        label_args = [
            arg for key, value in (labels or {}).items() for arg in ("--label", f"{key}={value}")
        ]
        option_args = ["--null-io"] if null_io else []
        if runc_root is not None:
            option_args += ["--runc-root", str(runc_root)]
        self.containers.add((namespace, container_id))
        self.ctr(
            "run",
            "-d",
            "--env",
            "PATH=/bin",
            *option_args,
            *label_args,
            "--rootfs",
            str(self.rootfs),
            container_id,
            *command,
            namespace=namespace,
        )
        return self.task_pid(namespace, container_id)

    def start_task(self, namespace: str, container_id: str) -> int:
        """Start a new task for a container whose old task was deleted, and return its PID."""
        self.ctr("tasks", "start", "--detach", container_id, namespace=namespace)
        return self.task_pid(namespace, container_id)

    def task_pid(self, namespace: str, container_id: str) -> int:
        """Return the PID of the container's task."""
        for line in self.ctr("tasks", "ls", namespace=namespace).stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == container_id:
                return int(fields[1])
        raise AssertionError(f"no task for container {namespace}/{container_id}")

    def task_status(self, namespace: str, container_id: str) -> str | None:
        """Return the status that ``ctr tasks ls`` lists for the container's task, or None."""
        for line in self.ctr("tasks", "ls", namespace=namespace).stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == container_id:
                return fields[2]
        return None

    def remove(self, namespace: str, container_id: str) -> None:
        """Kill and delete the container's task, then delete the container."""
        self.kill_task(namespace, container_id)
        self.delete_task(namespace, container_id)
        self.ctr("containers", "delete", container_id, namespace=namespace, check=False)
        self.containers.discard((namespace, container_id))

    def remove_all_containers(self) -> None:
        """Remove every container in every namespace, also ones this harness did not start.

        Does nothing when containerd is not running.
        """
        if self.process is None or self.process.poll() is not None:
            return
        for namespace in self.ctr("namespaces", "ls", "--quiet").stdout.split():
            listed = self.ctr("containers", "ls", "--quiet", namespace=namespace).stdout.split()
            for container_id in listed:
                self.remove(namespace, container_id)

    def kill_task(self, namespace: str, container_id: str) -> None:
        """Send SIGKILL to the container's task."""
        self.ctr(
            "tasks", "kill", "--signal", "SIGKILL", container_id, namespace=namespace, check=False
        )

    def kill_task_until_stopped(
        self, namespace: str, container_id: str, timeout: float = 15.0
    ) -> None:
        """Send SIGKILL to the container's task and wait until ctr lists it as STOPPED.

        Unlike ``kill_task``, a failed kill raises, and the task is not deleted.
        """
        self.ctr("tasks", "kill", "--signal", "SIGKILL", container_id, namespace=namespace)
        wait_for(
            lambda: self.task_status(namespace, container_id) == "STOPPED",
            timeout,
            f"task {namespace}/{container_id} to stop",
        )

    def delete_task(self, namespace: str, container_id: str) -> None:
        """Delete the container's task once it has stopped."""

        def deleted() -> bool:
            result = self.ctr("tasks", "delete", container_id, namespace=namespace, check=False)
            return result.returncode == 0 or "not found" in result.stderr

        wait_for(deleted, 10, f"task {namespace}/{container_id} to be deleted")


@dataclass
class WatcherEnv:
    """Folders and config for one daemon run, below ``base``."""

    base: Path
    containerd: Containerd
    namespaces: tuple[str, ...] = ()
    log_level: str = "debug"
    # Plugin folders in search order. A test puts a folder of wrapper plugins first.
    bin_dirs: tuple[Path, ...] = (CNI_BIN_DIR,)
    resync_interval: str = "5m"
    shutdown_timeout: str = "30s"
    conf_dir: Path = field(init=False)
    lease_dir: Path = field(init=False)
    state_dir: Path = field(init=False)
    netns_dir: Path = field(init=False)
    config_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.conf_dir = self.base / "net.d"
        self.lease_dir = self.base / "leases"
        self.state_dir = self.base / "state"
        self.netns_dir = self.base / "netns"
        self.config_path = self.base / "config.toml"
        self.conf_dir.mkdir(parents=True)
        for source in sorted(REFERENCE_CONF_DIR.iterdir()):
            self.write_network(source.name, json.loads(source.read_text()))
        self.write_config()

    def write_network(self, filename: str, network: dict[str, Any]) -> None:
        """Write a CNI config with host-local leases in this environment's folder.

        The reference bridge and subnet are replaced by the suite's BRIDGE and
        SUBNET; in a .conflist every plugin is adjusted the same way.
        """
        for plugin in network.get("plugins", [network]):
            if plugin.get("bridge") == REFERENCE_BRIDGE:
                plugin["bridge"] = BRIDGE
            ipam = plugin.get("ipam")
            if isinstance(ipam, dict) and ipam.get("type") == "host-local":
                ipam["dataDir"] = str(self.lease_dir)
                if ipam.get("subnet") == REFERENCE_SUBNET:
                    ipam["subnet"] = str(SUBNET)
        (self.conf_dir / filename).write_text(json.dumps(network, indent=2))

    def write_config(self) -> None:
        """Write the daemon's TOML config for this environment."""
        namespaces = ", ".join(f'"{name}"' for name in self.namespaces)
        bin_dirs = ", ".join(f'"{folder}"' for folder in self.bin_dirs)
        self.config_path.write_text(
            "[daemon]\n"
            f'resync_interval = "{self.resync_interval}"\n'
            f'shutdown_timeout = "{self.shutdown_timeout}"\n'
            "[containerd]\n"
            f'address = "{self.containerd.address}"\n'
            f"namespaces = [{namespaces}]\n"
            "[cni]\n"
            f'conf_dir = "{self.conf_dir}"\n'
            f"bin_dirs = [{bin_dirs}]\n"
            'default_networks = ["mynet", "lo"]\n'
            'plugin_timeout = "20s"\n'
            "[state]\n"
            f'dir = "{self.state_dir}"\n'
            f'netns_dir = "{self.netns_dir}"\n'
            "[log]\n"
            f'level = "{self.log_level}"\n'
        )

    def checkpoints(self) -> list[Path]:
        """Return the checkpoint files that exist now."""
        return sorted((self.state_dir / "checkpoints").glob("*/*.json"))

    def checkpoint(self, namespace: str, container_id: str) -> dict[str, Any] | None:
        """Return the container's checkpoint document, or None."""
        path = self.state_dir / "checkpoints" / namespace / f"{container_id}.json"
        try:
            return dict(json.loads(path.read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def wait_attached(
        self, namespace: str, container_id: str, timeout: float = 15.0
    ) -> dict[str, Any]:
        """Wait until the container's checkpoint is ``attached`` and return it."""

        def attached() -> dict[str, Any] | None:
            document = self.checkpoint(namespace, container_id)
            return document if document and document["phase"] == "attached" else None

        return wait_for(attached, timeout, f"{namespace}/{container_id} to be attached")

    def wait_detached(self, namespace: str, container_id: str, timeout: float = 15.0) -> None:
        """Wait until the container has no checkpoint."""
        wait_for(
            lambda: self.checkpoint(namespace, container_id) is None,
            timeout,
            f"{namespace}/{container_id} to be detached",
        )


class Daemon:
    """cni-watcher running as a subprocess, logging JSON lines to a file."""

    def __init__(self, env: WatcherEnv) -> None:
        self.env = env
        self.log_path = env.base / "daemon.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def start(self, wait_ready: bool = True) -> None:
        """Start the daemon and, by default, wait for its ``daemon.ready`` line."""
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "watcher", "run", "--config", str(self.env.config_path)],
                stdout=log,
                stderr=log,
                cwd=REPO,
            )
        if wait_ready:
            self.wait_for_log("daemon.ready", timeout=20)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 40.0) -> int:
        """Send ``signum`` to the daemon and return its exit status."""
        assert self.process is not None, "daemon not started"
        self.process.send_signal(signum)
        status = self.process.wait(timeout=timeout)
        self.process = None
        return status

    def crash(self) -> None:
        """SIGKILL the daemon and the plugins it runs, as systemd does when the daemon dies."""
        assert self.process is not None, "daemon not started"
        kill_with_children(self.process)
        self.process = None

    def logs(self) -> list[dict[str, Any]]:
        """Return the JSON log lines written since the last start."""
        with self.log_path.open("rb") as file:
            file.seek(self._log_offset)
            lines = file.read().decode(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def wait_for_log(self, event: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        """Wait for a log line with ``event`` and the given field values, and return it."""

        def find() -> dict[str, Any] | None:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"daemon exited with {self.process.returncode}: {self.tail()}")
            for line in self.logs():
                if line.get("event") == event and all(line.get(k) == v for k, v in fields.items()):
                    return line
            return None

        return wait_for(find, timeout, f"log line {event} {fields}")

    def errors(self) -> list[dict[str, Any]]:
        """Return the log lines at level error."""
        return [line for line in self.logs() if line.get("level") == "error"]

    def tail(self, count: int = 20) -> str:
        """Return the last lines of the daemon's log, for failure messages."""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-count:])


def container_addresses(pid: int, ifname: str = "eth0") -> list[str]:
    """Return the IPv4 addresses (CIDR) on ``ifname`` in the network namespace of ``pid``."""
    output = run(
        ["nsenter", "-t", str(pid), "-n", "ip", "-4", "-o", "addr", "show", "dev", ifname]
    ).stdout
    return [line.split()[3] for line in output.splitlines()]


def container_links(pid: int) -> dict[str, str]:
    """Return interface name -> flags in the network namespace of ``pid``."""
    output = run(["nsenter", "-t", str(pid), "-n", "ip", "-o", "link", "show"]).stdout
    links = {}
    for line in output.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        links[name] = line.split("<")[1].split(">")[0]
    return links


def nat_rules() -> list[str]:
    """Return the host's nat table as iptables-save prints it."""
    return run(["iptables-save", "-t", "nat"]).stdout.splitlines()


def bridge_veths(bridge: str = BRIDGE) -> list[str]:
    """Return the names of the host interfaces enslaved to ``bridge``."""
    output = run(["ip", "-o", "link", "show", "master", bridge], check=False).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in output.splitlines()]


def leases(env: WatcherEnv, network: str = "mynet") -> dict[str, str]:
    """Return host-local's leases for ``network``: IP -> file content (container ID and ifname)."""
    folder = env.lease_dir / network
    if not folder.is_dir():
        return {}
    reserved = {"lock"}
    return {
        path.name: path.read_text()
        for path in folder.iterdir()
        if path.name not in reserved and not path.name.startswith("last_reserved_ip")
    }


def pins(env: WatcherEnv) -> list[str]:
    """Return the mount points of network namespace pins below the env's netns folder."""
    return [mount for mount in _mount_points() if mount.startswith(str(env.netns_dir) + "/")]


def assert_no_leaks(
    env: WatcherEnv, cni_ids: Sequence[str], networks: Sequence[str] = ("mynet",)
) -> None:
    """Fail if a checkpoint, pin, lease, NAT rule or veth of the given CNI container IDs is left.

    Only the given containers' NAT chains count, so suites running side by
    side on other bridges do not fail each other's checks.
    """
    assert env.checkpoints() == [], f"checkpoints left: {env.checkpoints()}"
    assert pins(env) == [], f"netns pins left: {pins(env)}"
    for network in networks:
        owned = {ip: owner for ip, owner in leases(env, network).items() if _owned(owner, cni_ids)}
        assert owned == {}, f"IPAM leases left in {network}: {owned}"
    rules = nat_rules()
    left_rules = [rule for rule in rules if any(f'id: \\"{i}\\"' in rule for i in cni_ids)]
    assert left_rules == [], f"NAT rules left: {left_rules}"
    chains = {nat_chain(network, i) for network in networks for i in cni_ids}
    left_chains = [line for line in rules if line[1:].split(" ")[0] in chains]
    assert left_chains == [], f"CNI NAT chains left: {left_chains}"
    assert bridge_veths() == [], f"veths left on {BRIDGE}: {bridge_veths()}"


def _owned(owner: str, cni_ids: Sequence[str]) -> bool:
    return any(line.strip() in cni_ids for line in owner.splitlines())


def remove_bridge(bridge: str = BRIDGE) -> None:
    """Delete the test bridge and the bridge plugin's FORWARD rules for it, if present."""
    run(["ip", "link", "delete", bridge], check=False)


def _mount_points() -> Iterator[str]:
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            yield line.split()[1].replace("\\040", " ")


def unmount_below(base: Path) -> None:
    """Lazily unmount everything mounted below ``base``, deepest first."""
    for mount in sorted(_mount_points(), key=len, reverse=True):
        if mount.startswith(str(base) + "/"):
            run(["umount", "-l", mount], check=False)


def nat_chain(network: str, cni_id: str, prefix: str = "") -> str:
    """Return the name of a per-container NAT chain of the CNI plugins.

    ``prefix`` is "" for the ipMasq chain of bridge and ptp, "DN-" for
    portmap's DNAT chain. The name is ``CNI-``, the prefix and the hex
    SHA-512 of network name and container ID, cut to the 28 characters
    iptables allows, as containernetworking-plugins 1.1.1 makes it.
    """
    digest = hashlib.sha512((network + cni_id).encode()).hexdigest()
    return f"CNI-{prefix}{digest}"[:28]


def remove_nat_chain(chain: str) -> None:
    """Delete the POSTROUTING rules that jump to ``chain``, then flush and delete the chain."""
    for rule in nat_rules():
        if rule.startswith("-A POSTROUTING ") and rule.endswith(f" -j {chain}"):
            arguments = shlex.split(rule)
            run(["iptables", "-t", "nat", "-D", *arguments[1:]])
    run(["iptables", "-t", "nat", "-F", chain], check=False)
    run(["iptables", "-t", "nat", "-X", chain], check=False)


def child_pids(pid: int) -> list[int]:
    """Return the PIDs of the direct children of process ``pid``."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(child) for child in (task / "children").read_text().split()]
    return children


def kill_with_children(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``process`` and the process group of each of its children, as systemd would.

    A crashed service's unit is stopped before it restarts, and with
    ``KillMode=mixed`` the stop sends SIGKILL to every process left in the
    unit's cgroup (systemd.kill(5)). CNI plugins run in their own session, so
    each child leads a group that contains the programs it started.
    """
    children = child_pids(process.pid)
    process.kill()
    process.wait()
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child, signal.SIGKILL)
