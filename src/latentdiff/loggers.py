"""Logger factories that need a decision at run time (wandb online or offline)."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger

WANDB_MODES = ("online", "offline", "disabled")


def wandb_logged_in() -> bool:
    """True when wandb has credentials: WANDB_API_KEY, or an api.wandb.ai entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC", Path.home() / ".netrc")).authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_logger(mode: str | None = None, **kwargs: Any) -> WandbLogger:
    """A `WandbLogger` that never prompts: online only when logged in, or when `mode` says so.

    Args:
        mode: "online", "offline", "disabled", or None to choose (WANDB_MODE if set, else online when
            logged in, else offline; sync offline runs later with `wandb sync <run dir>/wandb/offline-run-*`).
        **kwargs: passed to `WandbLogger` (project, name, save_dir, tags, ...).
    """
    mode = mode or os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
    if mode not in WANDB_MODES:
        raise ValueError(f"logger.wandb.mode={mode!r} is not supported; use one of {', '.join(WANDB_MODES)}")
    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(mode=mode, **kwargs)
