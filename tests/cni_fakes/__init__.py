"""A scriptable fake CNI plugin for tests.

``write_fake_plugin`` writes an executable Python script into a bin dir. The
test sets what the script prints for each command, its exit code and a sleep.
On every call the script appends one JSON line to a record file with its pid,
its whole environment, its parsed stdin and its start time. Unless the test
sets its output, VERSION prints the ``supported_versions`` as the CNI skel
package does, with exit code 0.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from watcher.cni.version import SUPPORTED_VERSIONS

_SCRIPT = """#!{python}
import json, os, signal, sys, time

SETTINGS = json.loads({settings!r})

if SETTINGS["ignore_sigterm"]:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

raw_stdin = sys.stdin.read()
try:
    config = json.loads(raw_stdin)
except ValueError:
    config = raw_stdin
command = os.environ.get("CNI_COMMAND", "")
record = {{
    "type": SETTINGS["name"],
    "pid": os.getpid(),
    "env": dict(os.environ),
    "stdin": config,
    "started": time.time(),
}}
with open(SETTINGS["record"], "a") as record_file:
    record_file.write(json.dumps(record) + "\\n")

if command == "VERSION" and command not in SETTINGS["stdout"]:
    info = {{"cniVersion": "1.1.0", "supportedVersions": SETTINGS["supported_versions"]}}
    sys.stdout.write(json.dumps(info))
    sys.exit(0)

time.sleep(SETTINGS["sleep"])

stdout = SETTINGS["stdout"].get(command, "")
if SETTINGS["echo_prev_result"] and isinstance(config, dict) and "prevResult" in config:
    stdout = json.dumps(config["prevResult"])
sys.stdout.write(stdout)
sys.stderr.write(SETTINGS["stderr"])
sys.exit(SETTINGS["exit_code"])
"""


def write_fake_plugin(
    bin_dir: Path,
    name: str,
    record: Path,
    *,
    stdout: Mapping[str, str] | None = None,
    stderr: str = "",
    exit_code: int = 0,
    sleep: float = 0.0,
    ignore_sigterm: bool = False,
    echo_prev_result: bool = False,
    supported_versions: Sequence[str] = SUPPORTED_VERSIONS,
) -> Path:
    """Write an executable fake plugin named ``name`` and return its path.

    ``stdout`` maps a CNI command such as "ADD" to the text printed for it.
    With ``echo_prev_result`` the plugin prints its ``prevResult`` instead,
    when it received one, as chained plugins such as tuning do. A VERSION
    call without an entry in ``stdout`` prints ``supported_versions``, and
    ignores ``exit_code``, ``stderr`` and ``sleep``.
    """
    settings = {
        "name": name,
        "record": str(record),
        "stdout": dict(stdout or {}),
        "stderr": stderr,
        "exit_code": exit_code,
        "sleep": sleep,
        "ignore_sigterm": ignore_sigterm,
        "echo_prev_result": echo_prev_result,
        "supported_versions": list(supported_versions),
    }
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text(_SCRIPT.format(python=sys.executable, settings=json.dumps(settings)))
    path.chmod(0o755)
    return path


def read_records(record: Path, *, version_calls: bool = False) -> list[dict[str, Any]]:
    """Return the calls that fake plugins appended to ``record``, oldest first.

    VERSION calls, which the runtime makes before a plugin's first use, are
    left out unless ``version_calls`` is true.
    """
    if not record.exists():
        return []
    calls = [json.loads(line) for line in record.read_text().splitlines() if line]
    if version_calls:
        return calls
    return [call for call in calls if call["env"].get("CNI_COMMAND") != "VERSION"]
