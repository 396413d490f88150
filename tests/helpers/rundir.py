"""A run lock written by hand, as another process (or an earlier one) would have left it."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from latentdiff.runlock import LOCK


def write_lock(folder: Path, age_s: float = 0.0, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    path.write_text(json.dumps({"pid": 0, "host": socket.gethostname(), "started": "earlier", **fields}))
    if age_s:
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path
