"""The DiT's constructor arguments: the checks between them, without torch.

`DiT.__init__` runs `check_dit_args` first; `train.py` runs it on the composed config before Hydra starts and
before torch loads (`latentdiff.precheck`), so `model.patch_size=3` is answered at once. One check, one place.
"""

from __future__ import annotations

from typing import Any

TIME_CONVENTIONS = ("dit", "sit")


def check_dit_args(
    input_size: int = 32,
    patch_size: int = 2,
    hidden_size: int = 1152,
    num_heads: int = 16,
    num_classes: int = 1000,
    class_dropout_prob: float = 0.1,
    rope: bool = False,
    time_convention: str = "dit",
    guidance_channels: int | None = None,
    in_channels: int = 4,
    **_: Any,
) -> None:
    """Check the DiT's arguments (the others are plain sizes the config rules check).

    Raises:
        ValueError: one line naming the key, the value and what is allowed.
    """
    if input_size % patch_size:
        divisors = ", ".join(str(d) for d in range(1, input_size + 1) if input_size % d == 0)
        raise ValueError(
            f"model.patch_size={patch_size} does not divide the input size {input_size}; use one of {divisors}"
        )
    if hidden_size % num_heads:
        raise ValueError(f"model.hidden_size={hidden_size} is not a multiple of model.num_heads={num_heads}")
    if hidden_size % 4:
        raise ValueError(f"model.hidden_size={hidden_size} must be a multiple of 4 (the 2D sin-cos positions)")
    if rope and (hidden_size // num_heads) % 4:
        raise ValueError(
            f"model.rope=true needs a head width (hidden_size / num_heads = {hidden_size // num_heads}) "
            "that is a multiple of 4 (half the channels rotate by the row, half by the column)"
        )
    if num_classes < 0:
        raise ValueError(f"model.num_classes={num_classes} must be >= 0 (0: unconditional)")
    if num_classes > 0 and class_dropout_prob <= 0:
        raise ValueError(
            f"model.class_dropout_prob={class_dropout_prob} leaves no null class for classifier-free guidance; "
            "set it > 0 (DiT: 0.1; the labels are dropped by module.p_uncond)"
        )
    if time_convention not in TIME_CONVENTIONS:
        raise ValueError(
            f"model.time_convention={time_convention!r} is not allowed; use one of "
            + ", ".join(repr(c) for c in TIME_CONVENTIONS)
        )
    if guidance_channels is not None and not 1 <= guidance_channels <= in_channels:
        raise ValueError(
            f"model.guidance_channels={guidance_channels} must be null (all) or between 1 and the latent channels "
            f"{in_channels} (3: the official DiT sampling)"
        )


def check_dit_objective(model: Any, objective_kind: str, train_timesteps: int = 1000) -> None:
    """Check that a DiT's time convention and variance head fit the run's objective (its `Objective.kind` and
    `diffusion.scheduler.num_train_timesteps`: SiT's time is read from the project's time in thousandths).

    Raises:
        ValueError: one line naming the key, the value and what to set.
    """
    flow = objective_kind == "flow-matching"
    convention = model.get("time_convention", "dit")
    if convention == "sit" and not flow:
        raise ValueError(
            "model.time_convention=sit feeds the network SiT's flow time, but the objective is "
            f"{objective_kind}; use diffusion=flow (or flow_logit_normal), or model.time_convention=dit"
        )
    if convention == "sit" and int(train_timesteps) != 1000:
        raise ValueError(
            f"diffusion.scheduler.num_train_timesteps={train_timesteps}: model.time_convention=sit reads the flow "
            "time on SiT's 1000-step scale; keep 1000, or use model.time_convention=dit"
        )
    if flow and convention == "dit" and model.get("learn_sigma"):
        raise ValueError(
            "model.learn_sigma=true adds variance channels that the flow objective never trains; set "
            "model.learn_sigma=false, or model.time_convention=sit (SiT: its unused channels, for official weights)"
        )
