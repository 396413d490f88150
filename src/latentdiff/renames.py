"""Classes that moved: the old dotted names that files written before the move (checkpoints' run configs, exports,
samples folders) still hold, and their current names. Every reader of a stored `_target_` goes through
`canonical_target`: `trust` (building), `checkpoint.check_resumable` (resuming), `samples_folder` (continuing).
This module imports nothing.
"""

from __future__ import annotations

LEGACY_TARGETS: dict[str, str] = {
    "latentdiff.diffusion.GaussianDiffusion": "latentdiff.objectives.gaussian.GaussianDiffusion",
    "latentdiff.diffusion.FlowMatching": "latentdiff.objectives.flow.FlowMatching",
    "latentdiff.masking.MaskedTokens": "latentdiff.objectives.masked_tokens.MaskedTokens",
    # never built from a stored config (trainer is not a stored group), renamed in the same step
    "latentdiff.distributed.FSDP": "latentdiff.strategies.FSDP",
    "latentdiff.distributed.wrap_policy": "latentdiff.strategies.wrap_policy",
}


def canonical_target(name: str) -> str:
    """The current dotted name of a `_target_` that a stored config may hold under its old name."""
    return LEGACY_TARGETS.get(name, name)
