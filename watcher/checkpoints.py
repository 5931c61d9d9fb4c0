"""Checkpoints: what the daemon has attached, or is about to attach, to each container.

One JSON file per container at ``STATE_DIR/checkpoints/NAMESPACE/ID.json``.
A checkpoint is written *before* any plugin runs, holding the full network
configs and runtime args, so a daemon killed at any moment can still run DEL
with exactly what ADD was given. Files are replaced atomically: a reader sees
either the old or the new content, never a mix, even across a power loss.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from watcher.cni import Result
from watcher.errors import CheckpointError, CNIError

SCHEMA_VERSION = 1
_DIR_MODE = 0o700
_FILE_MODE = 0o600


class Phase(enum.StrEnum):
    """Phase of a container's attachment, stored in its checkpoint."""

    ATTACHING = "attaching"  # ADD may have run partly; DEL before anything else
    ATTACHED = "attached"  # every ADD succeeded
    DETACHING = "detaching"  # DEL started; finish it
    FAILED = "failed"  # ADD failed permanently and was cleaned with DEL


@dataclass(frozen=True)
class NetworkRecord:
    """One network as it was given to ADD, and the result ADD returned."""

    name: str
    ifname: str
    config: Mapping[str, Any]
    args: tuple[tuple[str, str], ...] = ()
    capability_args: Mapping[str, Any] = field(default_factory=dict)
    result: Mapping[str, Any] | None = None

    def addresses(self) -> list[str] | None:
        """Return the CIDR addresses in the stored ADD result, or None if it cannot be parsed."""
        if self.result is None:
            return []
        version = str(self.config.get("cniVersion", ""))
        try:
            return Result.parse(self.result, version).addresses()
        except CNIError:
            return None


@dataclass(frozen=True)
class Checkpoint:
    """The stored state of one container's attachment."""

    namespace: str
    container_id: str
    cni_container_id: str
    pid: int
    netns: str
    phase: Phase
    networks: tuple[NetworkRecord, ...]
    error: str | None = None
    updated_at: str = ""

    def with_phase(self, phase: Phase, **changes: Any) -> Checkpoint:
        """Return a copy in ``phase`` with the other given fields changed."""
        return replace(self, phase=phase, **changes)

    def to_json(self) -> dict[str, Any]:
        """Return the document written to disk, stamped with the schema version."""
        document = asdict(self)
        document["phase"] = self.phase.value
        document["updated_at"] = datetime.now(UTC).isoformat()
        return {"schema": SCHEMA_VERSION, **document}

    @classmethod
    def from_json(cls, document: Any) -> Checkpoint:
        """Build a Checkpoint from a parsed file; raises CheckpointError if it is not one."""
        if not isinstance(document, dict):
            raise CheckpointError("not a JSON object")
        if document.get("schema") != SCHEMA_VERSION:
            raise CheckpointError(f"unknown schema {document.get('schema')!r}")
        try:
            networks = tuple(_network_from_json(item) for item in document["networks"])
            return cls(
                namespace=str(document["namespace"]),
                container_id=str(document["container_id"]),
                cni_container_id=str(document["cni_container_id"]),
                pid=int(document["pid"]),
                netns=str(document["netns"]),
                phase=Phase(document["phase"]),
                networks=networks,
                error=document.get("error"),
                updated_at=str(document.get("updated_at", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"missing or invalid field: {exc!r}") from exc


class CheckpointStore:
    """Reads and writes checkpoint files below one folder."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "checkpoints"

    def path(self, namespace: str, container_id: str) -> Path:
        """Return the path of one container's checkpoint file."""
        return self.root / namespace / f"{container_id}.json"

    def read(self, namespace: str, container_id: str) -> Checkpoint | None:
        """Return the container's checkpoint, or None if it has none.

        Raises CheckpointError for a file that is empty, truncated, not JSON
        or of an unknown schema.
        """
        return self._read_path(self.path(namespace, container_id))

    def write(self, checkpoint: Checkpoint) -> None:
        """Replace the container's checkpoint atomically and durably."""
        path = self.path(checkpoint.namespace, checkpoint.container_id)
        data = json.dumps(checkpoint.to_json(), indent=2, sort_keys=True).encode()
        _ensure_dir(path.parent)

        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
        _fsync_dir(path.parent)

    def remove(self, namespace: str, container_id: str) -> None:
        """Delete the container's checkpoint durably; a missing file is not an error."""
        path = self.path(namespace, container_id)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        _fsync_dir(path.parent)
        # The namespace's folder goes with its last checkpoint.
        with contextlib.suppress(OSError):
            path.parent.rmdir()
            _fsync_dir(path.parent.parent)

    def quarantine(self, path: Path) -> Path:
        """Rename an unreadable checkpoint to ``NAME.corrupt``, kept for people but never read."""
        target = path.with_name(path.name + ".corrupt")
        os.replace(path, target)
        _fsync_dir(path.parent)
        return target

    def remove_partial_writes(self) -> list[Path]:
        """Delete the temporary files of writes cut short by a crash, and return their paths.

        Call it only while no write of this store is in progress, because an
        ongoing write's temporary file looks the same.
        """
        removed = []
        for path in sorted(self.root.glob("*/.*.json.*.tmp")):
            path.unlink(missing_ok=True)
            removed.append(path)
        return removed

    def scan(self) -> Iterator[tuple[Path, Checkpoint | CheckpointError]]:
        """Yield every checkpoint file with its content, or the error that reading it raised."""
        for path in sorted(self.root.glob("*/*.json")):
            try:
                checkpoint = self._read_path(path)
            except CheckpointError as exc:
                yield path, exc
                continue
            if checkpoint is not None:
                yield path, checkpoint

    def _read_path(self, path: Path) -> Checkpoint | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror}") from exc
        try:
            return Checkpoint.from_json(json.loads(data))
        except (ValueError, CheckpointError) as exc:
            raise CheckpointError(f"invalid checkpoint {path}: {exc}") from exc


def _network_from_json(item: Mapping[str, Any]) -> NetworkRecord:
    return NetworkRecord(
        name=str(item["name"]),
        ifname=str(item["ifname"]),
        config=dict(item["config"]),
        args=tuple((str(key), str(value)) for key, value in item.get("args", ())),
        capability_args=dict(item.get("capability_args", {})),
        result=dict(item["result"]) if item.get("result") is not None else None,
    )


def _ensure_dir(path: Path) -> None:
    # Path.mkdir applies mode only to the last folder, so create each level.
    if path.is_dir():
        return
    _ensure_dir(path.parent)
    path.mkdir(mode=_DIR_MODE, exist_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    # The rename or unlink is only durable once the folder entry is on disk.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
