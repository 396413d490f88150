"""Classifier-free guidance: the project's one helper, the null condition it guides against, and the condition
dropout that trains the unconditional model.

Convention (diffusers/DiT): out = uncond + w * (cond - uncond) on all channels; w = 1 is no guidance. A backbone
that learns its variance (2C channels) is guided on its C prediction channels; the variance values are the
conditional ones. A backbone may guide fewer (`Backbone.guidance_channels`: the official DiT, SiT and LightningDiT
sampling scripts guide the first 3 latent channels, "for exact reproducibility").
U-ViT's `scale` s is w = 1 + s (its ImageNet-256 setting s = 0.4 is w = 1.4). On token logits (the unmasking
loop) the same formula applies, as in aMUSEd's pipeline.
"""

from __future__ import annotations

import torch

from latentdiff.models.contract import Backbone, guided_channels


def null_condition(
    cond: torch.Tensor | None, num_classes: int, null_text: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The unconditional input shaped like `cond`: the null class id `num_classes`, or the empty-prompt
    features `null_text` (L, D) for text features (B, L, D)."""
    if cond is None:
        return None
    if not cond.is_floating_point():
        return torch.full_like(cond, num_classes)
    if null_text is None:
        raise ValueError("text conditioning needs the empty-prompt features (module.null_text); none were set")
    return null_text.to(cond.device, cond.dtype).expand_as(cond)


def drop_condition(
    cond: torch.Tensor | None, null_cond, p_uncond: float, generator: torch.Generator | None = None
) -> torch.Tensor | None:
    """CFG training: each condition of the batch replaced by `null_cond(cond)` with probability `p_uncond`."""
    if cond is None or p_uncond == 0.0:
        return cond
    drop = torch.rand(cond.shape[0], device=cond.device, generator=generator) < p_uncond  # (B,)
    return torch.where(drop.view(-1, *[1] * (cond.dim() - 1)), null_cond(cond), cond)


def guided_output(
    model: Backbone,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor | None,
    null_cond: torch.Tensor | None,
    guidance_scale: float,
) -> torch.Tensor:
    """Classifier-free guidance: uncond + w * (cond - uncond) on all channels.

    Conditional and unconditional halves run in one batch. With w == 1 or no condition the model runs once.

    Args:
        model: backbone, model(x, t, cond).
        x: (B, C, h, w) noisy latents, or (B, h, w) token ids.
        t: (B,) timesteps.
        cond: (B,) class ids or (B, L, D) text features, or None.
        null_cond: the "no condition" input shaped like cond (null class id / empty-prompt features).
        guidance_scale: w (diffusers/DiT convention; U-ViT's scale s is w = 1 + s).
    """
    if cond is None or guidance_scale == 1.0:
        return model(x, t, cond)
    if null_cond is None:
        raise ValueError("guidance_scale != 1 needs an unconditional input (null class or empty prompt)")
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null_cond.expand_as(cond)]))  # (2B, ...)
    out_cond, out_uncond = out.chunk(2)
    c = guided_channels(model, x.shape[1]) if x.is_floating_point() else out.shape[1]
    if c < out.shape[1]:  # a learned variance, or official DiT sampling: guide the first c channels, keep the
        guided = out_uncond[:, :c] + guidance_scale * (out_cond[:, :c] - out_uncond[:, :c])  # conditional rest
        return torch.cat([guided, out_cond[:, c:]], dim=1)  # (B, C or 2C, h, w)
    return out_uncond + guidance_scale * (out_cond - out_uncond)
