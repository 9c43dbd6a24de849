"""Where a run came from: package versions, the git commit of a source checkout, host, torch threads, command line,
start time.

Recorded in each run's summary.json so that a result found months later can be traced to the code that made it.
"""

from __future__ import annotations

import platform
import shlex
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

_GIT_TIMEOUT_S = 5.0


def package_version() -> str:
    try:
        return metadata.version("nvae-search")
    except metadata.PackageNotFoundError:  # imported from a checkout that was never installed
        return "unknown"


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=_GIT_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(source: Path | None = None) -> dict[str, Any] | None:
    """The commit and dirty flag of the checkout this package is imported from; None for an installed wheel."""
    here = source or Path(__file__).resolve().parent
    top = _git(["rev-parse", "--show-toplevel"], here)
    # Only the project's own checkout counts: a wheel installed inside some other repository is not a clone.
    if top is None or not (Path(top) / "nvae_search").is_dir() or not here.is_relative_to(Path(top).resolve()):
        return None
    commit = _git(["rev-parse", "HEAD"], here)
    status = _git(["status", "--porcelain", "--untracked-files=no"], here)
    if commit is None:
        return None
    return {"commit": commit, "dirty": bool(status), "root": top}


def _accelerator_versions() -> dict[str, Any]:
    import torch

    versions: dict[str, Any] = {"cuda": torch.version.cuda, "cudnn": None, "device": None}
    if torch.backends.cudnn.is_available():
        versions["cudnn"] = torch.backends.cudnn.version()
    if torch.cuda.is_available():
        versions["device"] = torch.cuda.get_device_name(0)
    return versions


def collect(started: datetime | None = None) -> dict[str, Any]:
    """The provenance block of summary.json."""
    import torch

    return {
        "nvae_search": package_version(),
        "torch": torch.__version__,
        **_accelerator_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git": git_state(),
        "host": socket.gethostname(),
        "threads": torch.get_num_threads(),  # step times depend on it
        "command": shlex.join(sys.argv),
        "started": (started or datetime.now(timezone.utc)).isoformat(timespec="seconds"),
    }
