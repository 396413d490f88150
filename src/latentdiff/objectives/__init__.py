"""Training objectives: siblings behind one interface (`base.Objective`).

- `gaussian.GaussianDiffusion`: discrete-time Gaussian diffusion (`diffusion=linear|cosine|...`)
- `flow.FlowMatching`: rectified flow (`diffusion=flow`)
- `masked_tokens.MaskedTokens`: masked VQ tokens (`diffusion=masked_tokens`)
"""

from __future__ import annotations

from typing import Any

from latentdiff.objectives.base import Objective
from latentdiff.objectives.flow import FlowMatching
from latentdiff.objectives.gaussian import GaussianDiffusion
from latentdiff.objectives.masked_tokens import MaskedTokens

OBJECTIVES: tuple[type[Objective], ...] = (GaussianDiffusion, FlowMatching, MaskedTokens)

__all__ = ["OBJECTIVES", "FlowMatching", "GaussianDiffusion", "MaskedTokens", "Objective", "objective_for"]


def objective_for(train_scheduler: Any) -> type[Objective]:
    """The objective class whose training scheduler `train_scheduler` is (a sampler copies its config).

    Raises:
        ValueError: no objective trains with this scheduler class.
    """
    for objective in OBJECTIVES:
        if isinstance(train_scheduler, objective.scheduler_class):
            return objective
    names = ", ".join(o.scheduler_class.__name__ for o in OBJECTIVES)
    raise ValueError(f"diffusion.scheduler={type(train_scheduler).__name__} trains no objective; use one of {names}")
