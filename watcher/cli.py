"""The ``cni-watcher`` command.

Exit status: 0 on success, 1 when a command fails at run time, 2 for bad
usage or an invalid config file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from watcher import __version__
from watcher.checkpoints import Checkpoint, CheckpointStore, NetworkRecord
from watcher.config import DEFAULT_CONFIG_PATH, Config, find_setup_problems, load_config
from watcher.errors import ConfigError, WatcherError
from watcher.logs import configure_logging

EXIT_FAILURE = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"cni-watcher: {exc}", file=sys.stderr)
        return EXIT_USAGE

    try:
        result: int = args.handler(config, args)
    except WatcherError as exc:
        print(f"cni-watcher: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cni-watcher",
        description="Attach CNI networks to containerd containers that opt in with a label.",
    )
    parser.add_argument("--version", action="version", version=f"cni-watcher {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the daemon in the foreground")
    run.set_defaults(handler=_run)
    check = commands.add_parser("check-config", help="validate the config file and exit")
    check.set_defaults(handler=_check_config)
    listing = commands.add_parser("list", help="list the containers that have a checkpoint")
    listing.add_argument("--json", action="store_true", help="print one JSON object per line")
    listing.set_defaults(handler=_list)

    for command in (run, check, listing):
        command.add_argument(
            "--config",
            type=Path,
            default=DEFAULT_CONFIG_PATH,
            help=f"path of the TOML config file (default: {DEFAULT_CONFIG_PATH})",
        )
    return parser


def _run(config: Config, args: argparse.Namespace) -> int:
    from watcher.daemon import Daemon

    configure_logging(config.log.format, config.log.level)
    return asyncio.run(Daemon(config).run())


def _check_config(config: Config, args: argparse.Namespace) -> int:
    print(f"{args.config}: valid")
    for problem in find_setup_problems(config):
        print(f"warning: {problem}", file=sys.stderr)
    return 0


def _list(config: Config, args: argparse.Namespace) -> int:
    checkpoints = []
    for _, item in CheckpointStore(config.state.dir).scan():
        if isinstance(item, WatcherError):
            print(f"cni-watcher: {item}", file=sys.stderr)
        else:
            checkpoints.append(item)

    if args.json:
        for checkpoint in checkpoints:
            print(json.dumps(_summary(checkpoint)))
    else:
        _print_table(checkpoints)
    return 0


def _summary(checkpoint: Checkpoint) -> dict[str, object]:
    networks = [
        {"network": record.name, "ifname": record.ifname, "ips": _addresses_shown(record)}
        for record in checkpoint.networks
    ]
    return {
        "namespace": checkpoint.namespace,
        "container_id": checkpoint.container_id,
        "pid": checkpoint.pid,
        "phase": checkpoint.phase.value,
        "networks": networks,
        "error": checkpoint.error,
    }


def _addresses_shown(record: NetworkRecord) -> list[str]:
    addresses = record.addresses()
    return ["?"] if addresses is None else addresses


def _print_table(checkpoints: list[Checkpoint]) -> None:
    lines = [("NAMESPACE", "CONTAINER", "PID", "PHASE", "NETWORKS")]
    for checkpoint in checkpoints:
        networks = " ".join(
            f"{record.name}:{record.ifname}={','.join(_addresses_shown(record)) or '-'}"
            for record in checkpoint.networks
        )
        row = (checkpoint.namespace, checkpoint.container_id, str(checkpoint.pid))
        lines.append((*row, checkpoint.phase.value, networks))

    widths = [max(len(line[column]) for line in lines) for column in range(4)]
    for line in lines:
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
        print("  ".join([*cells, line[4]]).rstrip())


if __name__ == "__main__":
    sys.exit(main())
