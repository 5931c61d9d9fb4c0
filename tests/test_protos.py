"""Checks of the containerd .proto subset in watcher/containerd/_pb.

The generated modules must be what scripts/gen-protos produces from the
committed .proto files, and every message, field and method must match the
descriptors compiled into the installed containerd binary.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor
from google.protobuf.message import DecodeError

from watcher.containerd._pb import (
    containers_pb2,
    events_pb2,
    namespaces_pb2,
    task_events_pb2,
    task_types_pb2,
    tasks_pb2,
    version_pb2,
)

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = Path("watcher/containerd/_pb")
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
OUR_FILES: list[FileDescriptor] = [
    module.DESCRIPTOR
    for module in (
        containers_pb2,
        events_pb2,
        namespaces_pb2,
        task_events_pb2,
        task_types_pb2,
        tasks_pb2,
        version_pb2,
    )
]
# Start of a gzip member with no file name and no modification time, the form
# in which Go's gogo/golang protobuf v1 registers compressed file descriptors.
GZIP_MEMBER_START = b"\x1f\x8b\x08\x00\x00\x00\x00\x00"
# Upper bound on one compressed descriptor. The largest in containerd 1.6.20,
# the tasks service's, is 1,400 bytes.
MAX_DESCRIPTOR_BYTES = 256 * 1024


def _generated_files(root: Path) -> dict[str, bytes]:
    folder = root / PROTO_DIR
    return {
        path.name: path.read_bytes()
        for path in sorted(folder.iterdir())
        if path.name.endswith(GENERATED_SUFFIXES)
    }


def test_generated_stubs_match_protos(tmp_path: Path) -> None:
    """scripts/gen-protos reproduces every committed generated module byte for byte."""
    result = subprocess.run(
        [str(REPOSITORY_ROOT / "scripts" / "gen-protos"), str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": shutil.which("python3") or "python3"},
    )
    assert result.returncode == 0, f"scripts/gen-protos failed: {result.stderr}"

    fresh = _generated_files(tmp_path)
    committed = _generated_files(REPOSITORY_ROOT)
    hint = "run scripts/gen-protos with the pinned grpcio-tools and commit the result"

    assert sorted(committed) == sorted(fresh), f"generated file set differs; {hint}"
    for name, content in fresh.items():
        assert committed[name] == content, f"{PROTO_DIR / name} is out of date; {hint}"


def test_generated_modules_import_from_package() -> None:
    """Generated modules import each other through the watcher.containerd._pb package."""
    tasks_module = (REPOSITORY_ROOT / PROTO_DIR / "tasks_pb2.py").read_text()

    assert "from watcher.containerd._pb import task_types_pb2" in tasks_module


def _containerd_descriptors(binary: Path) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """Extract the compressed containerd file descriptors that a Go binary embeds."""
    data = binary.read_bytes()
    found: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    start = data.find(GZIP_MEMBER_START)
    while start >= 0:
        try:
            raw = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(
                data[start : start + MAX_DESCRIPTOR_BYTES]
            )
            descriptor = descriptor_pb2.FileDescriptorProto.FromString(raw)
        except (zlib.error, DecodeError):
            # Other gzip data, or bytes that only look like a gzip header.
            descriptor = None
        if descriptor is not None and descriptor.package.startswith("containerd."):
            found[descriptor.name] = descriptor
        start = data.find(GZIP_MEMBER_START, start + 1)
    return found


# Messages, enums and services by full name, without the leading dot.
_Index = tuple[
    dict[str, descriptor_pb2.DescriptorProto],
    dict[str, descriptor_pb2.EnumDescriptorProto],
    dict[str, descriptor_pb2.ServiceDescriptorProto],
]


def _index(files: list[descriptor_pb2.FileDescriptorProto]) -> _Index:
    messages: dict[str, descriptor_pb2.DescriptorProto] = {}
    enums: dict[str, descriptor_pb2.EnumDescriptorProto] = {}
    services: dict[str, descriptor_pb2.ServiceDescriptorProto] = {}

    def add_messages(prefix: str, message_types: list[descriptor_pb2.DescriptorProto]) -> None:
        for message in message_types:
            name = f"{prefix}.{message.name}"
            messages[name] = message
            add_messages(name, list(message.nested_type))
            for enum in message.enum_type:
                enums[f"{name}.{enum.name}"] = enum

    for file in files:
        add_messages(file.package, list(file.message_type))
        for enum in file.enum_type:
            enums[f"{file.package}.{enum.name}"] = enum
        for service in file.service:
            services[f"{file.package}.{service.name}"] = service
    return messages, enums, services


@pytest.fixture(scope="module")
def containerd_index() -> _Index:
    path = shutil.which("containerd")
    if path is None:
        message = "containerd binary not found on PATH"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    descriptors = _containerd_descriptors(Path(path))
    if not descriptors:
        # NOTE: this scan was only run on containerd 1.6, whose gogo protobuf
        # code registers gzip-compressed descriptors. Later releases may store
        # them in a form that it does not find.
        pytest.skip(f"found no compressed containerd descriptors in {path}")
    return _index(list(descriptors.values()))


def _our_index() -> _Index:
    files = []
    for file in OUR_FILES:
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        files.append(proto)
    return _index(files)


def test_messages_match_containerd(containerd_index: _Index) -> None:
    """Every field of our messages has containerd's name, number, type and label."""
    their_messages = containerd_index[0]
    our_messages = _our_index()[0]

    for name, message in our_messages.items():
        assert name in their_messages, f"containerd has no message {name}"
        their_fields = {field.number: field for field in their_messages[name].field}
        for field in message.field:
            where = f"{name}.{field.name} = {field.number}"
            assert field.number in their_fields, f"containerd has no field number of {where}"
            theirs = their_fields[field.number]
            assert theirs.name == field.name, f"{where}: containerd names it {theirs.name}"
            assert theirs.type == field.type, f"{where}: containerd type is {theirs.type}"
            assert theirs.label == field.label, f"{where}: containerd label is {theirs.label}"
            assert theirs.type_name == field.type_name, (
                f"{where}: containerd type is {theirs.type_name}"
            )


def test_enums_match_containerd(containerd_index: _Index) -> None:
    """Every enum value of ours has containerd's name and number."""
    their_enums = containerd_index[1]
    our_enums = _our_index()[1]

    for name, enum in our_enums.items():
        assert name in their_enums, f"containerd has no enum {name}"
        theirs = {value.name: value.number for value in their_enums[name].value}
        for value in enum.value:
            assert theirs.get(value.name) == value.number, f"{name}.{value.name} differs"


def test_services_match_containerd(containerd_index: _Index) -> None:
    """Every method of ours has containerd's request type, response type and streaming."""
    their_services = containerd_index[2]
    our_services = _our_index()[2]

    for name, service in our_services.items():
        assert name in their_services, f"containerd has no service {name}"
        their_methods = {method.name: method for method in their_services[name].method}
        for method in service.method:
            where = f"{name}/{method.name}"
            assert method.name in their_methods, f"containerd has no method {where}"
            theirs = their_methods[method.name]
            assert theirs.input_type == method.input_type, f"{where}: request type differs"
            assert theirs.output_type == method.output_type, f"{where}: response type differs"
            assert theirs.server_streaming == method.server_streaming, f"{where}: streaming differs"
