"""The unmasking loop (MaskGIT; aMUSEd's pipeline loop) around diffusers' `AmusedScheduler`, and its options.

Glossary: x (B, h, w) token ids, all the mask id at the start; logits (B, K, h, w) over the codebook; w the
guidance weight on the logits (`samplers.cfg`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AmusedScheduler

from latentdiff.models.contract import Backbone
from latentdiff.objectives.base import Generators
from latentdiff.samplers.cfg import guided_output

UNMASK_OPTIONS = ("temperature", "starting_mask_ratio")  # sampler.step_kwargs of the unmasking loop


def check_unmask_options(
    step_kwargs: dict[str, Any], guidance_interval: Sequence[float] | None, key: str = "sampler"
) -> None:
    """Raise one line for a `<key>.step_kwargs` entry the unmasking loop does not take, or a guidance interval."""
    unknown = sorted(set(step_kwargs) - set(UNMASK_OPTIONS))
    if unknown:
        raise ValueError(
            f"{key}.step_kwargs.{unknown[0]} is not an option of the masked-token sampler; use "
            f"{' or '.join(UNMASK_OPTIONS)}"
        )
    if guidance_interval is not None:
        raise ValueError(
            f"{key}.guidance_interval is not supported by the masked-token sampler (its steps are not noise "
            f"levels); use {key}.guidance_interval=null"
        )


@torch.no_grad()
def unmask_loop(
    model: Backbone,
    scheduler: AmusedScheduler,
    shape: tuple[int, int, int],
    num_steps: int,
    cond: torch.Tensor | None = None,
    null_cond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    generator: Generators = None,
    temperature: float | Sequence[float] = (2.0, 0.0),
    starting_mask_ratio: float = 1.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Iterative unmasking with `AmusedScheduler` from an all-mask image to token ids.

    Args:
        model: token backbone (usually the EMA copy), model(ids, t, cond) -> logits (B, K, h, w).
        scheduler: a sampling `AmusedScheduler`; its state is reset here.
        shape: (B, h, w) of the token grid.
        num_steps: unmasking steps (>= 1: `sampler.steps` is checked with the config).
        cond, null_cond, guidance_scale: as in `samplers.cfg.guided_output` (on the logits).
        generator: one generator, or one per sample: then each sample's draws (the token choices and the Gumbel
            noise of the re-masking) depend only on its own generator, and `scheduler.step` runs per sample.
        temperature: Gumbel temperature of the re-masking, [start, end] linearly over the steps (aMUSEd: [2, 0]).
        starting_mask_ratio: scales the schedule's mask ratio (`AmusedScheduler.step`).
        device: where the ids are made.

    Returns:
        Token ids (B, h, w) int64 in [0, K).
    """
    if isinstance(temperature, Sequence) and not isinstance(temperature, str):  # also OmegaConf's ListConfig
        temperature = tuple(float(v) for v in temperature)
    else:
        temperature = float(temperature)
    scheduler.set_timesteps(num_steps, temperature, device=device)
    x = torch.full(shape, int(scheduler.config.mask_token_id), dtype=torch.long, device=device)  # (B, h, w)
    for t in scheduler.timesteps:
        t_batch = t.expand(shape[0])  # (B,)
        logits = guided_output(model, x, t_batch, cond, null_cond, guidance_scale).float()  # (B, K, h, w)
        if isinstance(generator, list):  # per sample: a draw never depends on the other samples of the batch
            x = torch.cat(
                [
                    scheduler.step(logits[i : i + 1], t, x[i : i + 1], starting_mask_ratio, g, return_dict=False)[0]
                    for i, g in enumerate(generator)
                ]
            )
        else:
            x = scheduler.step(logits, t, x, starting_mask_ratio, generator, return_dict=False)[0]  # (B, h, w)
    return x
