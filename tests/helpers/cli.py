"""Running the project's commands in a subprocess, as a user does (the e2e tier)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_python(tmp_path: Path, argv: list[str], **env_extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "0", **env_extra}
    env.pop("LATENTDIFF_DEBUG", None)
    return subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
