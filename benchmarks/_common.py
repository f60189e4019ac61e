"""What every benchmark report states: the machine and the code measured."""

from __future__ import annotations

import os
import platform
import subprocess

import distloop


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def code_version() -> str:
    """distloop's version and git commit, flagged when distloop/ has uncommitted changes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "distloop")
    except (OSError, subprocess.CalledProcessError):
        return f"distloop {distloop.__version__}"
    return f"distloop {distloop.__version__} ({head}{', with uncommitted changes to distloop/' if dirty else ''})"
