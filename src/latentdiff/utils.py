"""Small helpers shared by the entry functions."""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path

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


def artefact_not_loaded(key: str, pretrained: str, err: Exception, alternative: str = "") -> FileNotFoundError:
    """The one-line error for a hub id or folder that could not be loaded (offline, or a wrong path).

    Args:
        key: the config key that names the artefact (e.g. "vae.pretrained").
        pretrained: its value.
        err: the loader's exception (its first line is quoted).
        alternative: another way to make the folder, quoted in parentheses.
    """
    extra = f" ({alternative})" if alternative else ""
    path = Path(pretrained).expanduser()
    if not path.exists() and (pretrained.startswith(("/", ".", "~")) or pretrained.count("/") > 1):
        return FileNotFoundError(  # a path, not a hub id (org/name): the loader's words would only repeat it
            f"{key}={pretrained!r} does not exist -- on a machine with internet run `huggingface-cli download "
            f"<org/name> --local-dir <dir>`{extra} and set {key}=<dir>"
        )
    where = "local folder" if path.exists() else "hub id"
    first = str(err).splitlines()[0] if str(err) else err.__class__.__name__
    return FileNotFoundError(
        f"{key}={pretrained!r} ({where}) could not be loaded: {first} -- on a machine with internet run "
        f"`huggingface-cli download {pretrained} --local-dir <dir>`{extra} and set {key}=<dir>"
    )


def native_bf16() -> bool:
    """Whether this machine computes bfloat16 matmuls natively: a CUDA GPU, or a CPU with AVX512-BF16 or AMX
    (x86) or the BF16 extension (aarch64). Elsewhere torch emulates bf16 on the CPU, about 75x slower than fp32
    (measured: 0.8 vs 59 GFLOP/s on a 2-core AMD EPYC without AVX512-BF16)."""
    import torch

    if torch.cuda.is_available():
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16", "bf16"))


def fast_precision(native: str = "bf16-mixed", fallback: str = "32-true") -> str:
    """`native` where bfloat16 is computed natively (`native_bf16`), else `fallback` (the `ld.fast_precision`
    resolver of the quickstarts: bf16-mixed is 1.4x the fp32 speed on an AVX512-BF16 CPU and 40x slower
    without it)."""
    return native if native_bf16() else fallback
