"""Small helpers shared by the entry functions."""

from __future__ import annotations

import importlib.metadata
import platform

_PACKAGES = ("latentdiff", "torch", "lightning", "diffusers", "hydra-core", "torch-fidelity", "torchvision")


def framework_versions() -> dict[str, str]:
    """Versions of Python and the core libraries, recorded in checkpoints and metrics."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
