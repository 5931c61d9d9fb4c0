"""Measure attach and detach latency and the daemon's memory on a private containerd.

Run as root from the repository root, after scripts/setup:

    .venv/bin/python -m benchmarks.attach_latency [--sequential 20] [--burst 50]

It starts a private containerd and the daemon exactly as the integration
tests do (tests/integration/harness.py), with the reference networks, and
prints a Markdown table. Results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.integration.harness import (
    Containerd,
    Daemon,
    WatcherEnv,
    assert_no_leaks,
    remove_bridge,
    require_prerequisites,
    unmount_below,
    wait_for,
)

LABELS = {"cni-watcher/networks": "mynet,lo"}
NAMESPACE = "bench"


def main(argv: Sequence[str] | None = None) -> None:
    """Run the measurements and print them as Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequential", type=int, default=20, help="containers started one by one")
    parser.add_argument("--burst", type=int, default=50, help="containers started at once")
    args = parser.parse_args(argv)
    require_prerequisites()

    base = Path(tempfile.mkdtemp(prefix="cniw-bench-"))
    containerd = Containerd(base / "containerd")
    containerd.start()
    env_base = base / "env"
    env_base.mkdir()
    env = WatcherEnv(base=env_base, containerd=containerd, log_level="info")
    daemon = Daemon(env)
    forwarding = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    try:
        daemon.start()
        rows = measure(containerd, env, daemon, args.sequential, args.burst)
    finally:
        if daemon.process is not None:
            daemon.stop()
        containerd.close()
        unmount_below(base)
        shutil.rmtree(base, ignore_errors=True)
        remove_bridge()
        Path("/proc/sys/net/ipv4/ip_forward").write_text(forwarding)
    print_table(rows)


def measure(
    containerd: Containerd, env: WatcherEnv, daemon: Daemon, sequential: int, burst: int
) -> list[tuple[str, str]]:
    """Return (measurement, value) rows."""
    assert daemon.process is not None
    rows = [("daemon RSS, idle", f"{rss_mib(daemon.process.pid):.1f} MiB")]

    from_run, from_return, detach = [], [], []
    for index in range(sequential):
        container_id = f"seq{index}"
        before = time.monotonic()
        containerd.start_container(NAMESPACE, container_id, LABELS)
        returned = time.monotonic()
        poll(functools.partial(has_phase, env, container_id, "attached"))
        attached = time.monotonic()
        from_run.append(attached - before)
        from_return.append(attached - returned)

        containerd.kill_task(NAMESPACE, container_id)
        containerd.delete_task(NAMESPACE, container_id)
        deleted = time.monotonic()
        poll(functools.partial(has_phase, env, container_id, None))
        detach.append(time.monotonic() - deleted)
        containerd.remove(NAMESPACE, container_id)

    rows += [
        (f"attach, from `ctr run` start ({sequential} runs)", summary(from_run)),
        (f"attach, from `ctr run -d` return ({sequential} runs)", summary(from_return)),
        (f"detach, from `ctr tasks delete` return ({sequential} runs)", summary(detach)),
    ]
    rows += measure_burst(containerd, env, daemon, burst)
    assert_no_leaks(env, [f"{NAMESPACE}--seq{i}" for i in range(sequential)])
    return rows


def measure_burst(
    containerd: Containerd, env: WatcherEnv, daemon: Daemon, burst: int
) -> list[tuple[str, str]]:
    """Start ``burst`` containers at once and time until all are attached, then detached."""
    assert daemon.process is not None
    ids = [f"burst{index}" for index in range(burst)]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda cid: containerd.start_container(NAMESPACE, cid, LABELS), ids))
    for container_id in ids:
        env.wait_attached(NAMESPACE, container_id, timeout=120)
    all_attached = time.monotonic() - started
    rss = rss_mib(daemon.process.pid)

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda cid: containerd.remove(NAMESPACE, cid), ids))
    wait_for(lambda: not env.checkpoints(), 120, "every burst container to be detached")
    all_detached = time.monotonic() - started
    assert_no_leaks(env, [f"{NAMESPACE}--{cid}" for cid in ids])
    return [
        (f"{burst} containers started at once, until all attached", f"{all_attached:.1f} s"),
        (f"daemon RSS with {burst} containers attached", f"{rss:.1f} MiB"),
        (f"{burst} containers deleted at once, until all detached", f"{all_detached:.1f} s"),
    ]


def has_phase(env: WatcherEnv, container_id: str, expected: str | None) -> bool:
    """Return whether the container's checkpoint is in phase ``expected`` (None: has none)."""
    checkpoint = env.checkpoint(NAMESPACE, container_id)
    return (None if checkpoint is None else checkpoint["phase"]) == expected


def poll(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    """Wait for ``predicate`` to hold, checking every 2 ms so the timing stays fine-grained."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        time.sleep(0.002)


def summary(seconds: list[float]) -> str:
    """Return median, 90th percentile and maximum in milliseconds."""
    ordered = sorted(seconds)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return (
        f"median {statistics.median(ordered) * 1000:.0f} ms, "
        f"p90 {p90 * 1000:.0f} ms, max {ordered[-1] * 1000:.0f} ms"
    )


def rss_mib(pid: int) -> float:
    """Return the resident set size of ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def print_table(rows: list[tuple[str, str]]) -> None:
    """Print the rows as a Markdown table with the machine they ran on."""
    print(f"{os.cpu_count()} CPUs, kernel {os.uname().release}\n")
    print("| measurement | result |")
    print("| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
