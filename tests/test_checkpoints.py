"""Tests for the checkpoint store: atomic writes, schema checks and scanning."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from watcher.checkpoints import (
    SCHEMA_VERSION,
    Checkpoint,
    CheckpointStore,
    NetworkRecord,
    Phase,
)
from watcher.errors import CheckpointError

BRIDGE_CONFIG = {
    "cniVersion": "0.2.0",
    "name": "mynet",
    "plugins": [{"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}}],
}


def make_checkpoint(phase: Phase = Phase.ATTACHING, container_id: str = "web") -> Checkpoint:
    return Checkpoint(
        namespace="example",
        container_id=container_id,
        cni_container_id=f"example--{container_id}",
        pid=4242,
        netns=f"/run/cni-watcher/netns/example/{container_id}",
        phase=phase,
        networks=(
            NetworkRecord(
                name="mynet",
                ifname="eth0",
                config=BRIDGE_CONFIG,
                args=(("IgnoreUnknown", "1"), ("IP", "10.22.0.50")),
                capability_args={"portMappings": [{"hostPort": 8080, "containerPort": 80}]},
                result={"cniVersion": "0.2.0", "ip4": {"ip": "10.22.0.50/16"}},
            ),
        ),
    )


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    """A written checkpoint reads back equal, apart from the write time stamp."""
    store = CheckpointStore(tmp_path)
    checkpoint = make_checkpoint()

    store.write(checkpoint)
    loaded = store.read("example", "web")

    assert loaded is not None
    assert loaded.updated_at != ""
    assert loaded == Checkpoint(**{**checkpoint.__dict__, "updated_at": loaded.updated_at})


def test_file_layout_and_modes(tmp_path: Path) -> None:
    """Files live at checkpoints/NAMESPACE/ID.json, folders 0700 and files 0600."""
    store = CheckpointStore(tmp_path)

    store.write(make_checkpoint())

    path = tmp_path / "checkpoints" / "example" / "web.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700
    document = json.loads(path.read_text())
    assert document["schema"] == SCHEMA_VERSION
    assert document["phase"] == "attaching"


def test_write_replaces_without_temporaries(tmp_path: Path) -> None:
    """A second write replaces the first and leaves no temporary file behind."""
    store = CheckpointStore(tmp_path)

    store.write(make_checkpoint(Phase.ATTACHING))
    store.write(make_checkpoint(Phase.ATTACHED))

    folder = tmp_path / "checkpoints" / "example"
    assert os.listdir(folder) == ["web.json"]
    loaded = store.read("example", "web")
    assert loaded is not None
    assert loaded.phase is Phase.ATTACHED


def test_read_missing_is_none(tmp_path: Path) -> None:
    """A container without a checkpoint reads as None."""
    assert CheckpointStore(tmp_path).read("example", "absent") is None


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "invalid checkpoint"),
        (b'{"schema": 1, "namespace": "exa', "invalid checkpoint"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"schema": 99}', "unknown schema 99"),
        (b'{"schema": 1, "namespace": "example"}', "missing or invalid field"),
    ],
)
def test_read_corrupt_raises(tmp_path: Path, content: bytes, reason: str) -> None:
    """Empty, truncated, non-object, unknown-schema and incomplete files raise CheckpointError."""
    store = CheckpointStore(tmp_path)
    path = store.path("example", "web")
    path.parent.mkdir(parents=True)
    path.write_bytes(content)

    with pytest.raises(CheckpointError) as raised:
        store.read("example", "web")

    assert reason in str(raised.value)
    assert str(path) in str(raised.value)


def test_scan_yields_checkpoints_and_errors(tmp_path: Path) -> None:
    """scan returns every checkpoint and, for unreadable files, the error instead."""
    store = CheckpointStore(tmp_path)
    store.write(make_checkpoint(container_id="a"))
    store.write(make_checkpoint(container_id="b"))
    store.path("example", "c").write_bytes(b"")

    items = {path.name: item for path, item in store.scan()}

    assert isinstance(items["a.json"], Checkpoint)
    assert isinstance(items["b.json"], Checkpoint)
    assert isinstance(items["c.json"], CheckpointError)


def test_quarantine_moves_aside(tmp_path: Path) -> None:
    """quarantine renames the file with a .corrupt suffix so scan no longer lists it."""
    store = CheckpointStore(tmp_path)
    path = store.path("example", "web")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"{")

    target = store.quarantine(path)

    assert target == path.with_name("web.json.corrupt")
    assert target.read_bytes() == b"{"
    assert list(store.scan()) == []


def test_remove_is_idempotent(tmp_path: Path) -> None:
    """remove deletes the file and does nothing the second time."""
    store = CheckpointStore(tmp_path)
    store.write(make_checkpoint())

    store.remove("example", "web")
    store.remove("example", "web")

    assert store.read("example", "web") is None


def test_remove_partial_writes_keeps_checkpoints(tmp_path: Path) -> None:
    """remove_partial_writes deletes the temporary files of cut-short writes and nothing else."""
    store = CheckpointStore(tmp_path)
    store.write(make_checkpoint(container_id="web"))
    leftover = store.path("example", "web").with_name(".web.json.a1b2c3.tmp")
    leftover.write_bytes(b'{"schema": 1, "namesp')
    other = store.path("example", "web").with_name("notes.tmp")
    other.write_bytes(b"kept")

    removed = store.remove_partial_writes()

    assert removed == [leftover]
    assert not leftover.exists()
    assert other.exists()
    assert store.read("example", "web") is not None


def test_record_addresses_from_result() -> None:
    """A record lists the addresses of its stored result, and None for one that does not parse."""
    parsed = make_checkpoint().networks[0]
    empty = NetworkRecord(name="lo", ifname="lo", config=BRIDGE_CONFIG)
    broken = NetworkRecord(name="mynet", ifname="eth0", config=BRIDGE_CONFIG, result={"ip4": 5})

    assert parsed.addresses() == ["10.22.0.50/16"]
    assert empty.addresses() == []
    assert broken.addresses() is None
