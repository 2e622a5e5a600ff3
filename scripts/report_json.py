"""The one way the measuring scripts here write their JSON report: whole or not at all (a write to a temporary file
that replaces the report), so that a device job polled or killed mid-run never leaves half a file behind."""

import json
import os


def save_json(report, path) -> None:
    """``report`` as indented JSON at ``path``; nothing where ``path`` is None."""
    if path is None:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


def print_and_save(report, path) -> None:
    """``report`` on standard output, then ``save_json``."""
    print(json.dumps(report, indent=1))
    save_json(report, path)
