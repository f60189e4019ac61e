"""Run a command with a deadline, and on timeout kill everything it started (torchrun's workers too)."""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any


def run(cmd: list[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess:
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          **kwargs) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            raise AssertionError(f"{' '.join(cmd)} did not finish in {timeout}s; stderr:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)
