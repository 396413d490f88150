"""Masked-token training (MaskGIT, Chang et al. 2022; aMUSEd, Patil et al. 2024) around diffusers'
`AmusedScheduler`, for token backbones (`model=uvit2d`) on VQ token ids (`vae=vq_*`), and the checks that tie
the backbone, the VQ model and the objective together. Sampling: `latentdiff.samplers.unmask`.

The schedule comes from `AmusedScheduler` (its `mask_token_id` and `masking_schedule`); this module writes what
diffusers leaves to the training script, as aMUSEd's `train_amused.py` does it.

Glossary:
    x0     token ids of the clean image (B, h, w) int64 in [0, K), K = codebook size
    m      the mask id, `mask_token_id` = vocab_size - 1 >= K
    r      masking time in [0, 1] (B,), uniform
    gamma  the masked fraction at r: cos(pi r / 2) (cosine schedule) or 1 - r (linear), at least min_masking_rate
    n      masked tokens per image: round(gamma * h * w), at least 1
    u      uniform noise (B, h, w): the tokens whose rank in u is below n are masked (a uniformly random subset
           of exactly n tokens, aMUSEd's `rand(...).argsort()`)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AmusedScheduler

from latentdiff.models.contract import Backbone
from latentdiff.objectives.base import Objective

MASKING_SCHEDULES = ("cosine", "linear")


class MaskedTokens(Objective):
    """The masked-token objective: cross-entropy of the original ids at the masked positions.

    Args:
        scheduler: the `AmusedScheduler` whose `mask_token_id` and `masking_schedule` training uses (and whose
            config the sampler copies).
        min_masking_rate: lower bound of gamma (aMUSEd's `--min_masking_rate`, 0 by default).
        label_smoothing: of the cross-entropy (MaskGIT uses 0.1; aMUSEd 0).
    """

    kind = "masked-token"
    input_kind = "tokens"
    scheduler_class = AmusedScheduler
    prediction_type = "tokens"

    def __init__(self, scheduler: AmusedScheduler, min_masking_rate: float = 0.0, label_smoothing: float = 0.0):
        if not isinstance(scheduler, AmusedScheduler):
            raise ValueError(
                f"diffusion.scheduler={type(scheduler).__name__} cannot define masked-token training; "
                "use diffusers.AmusedScheduler (diffusion=masked_tokens)"
            )
        schedule = scheduler.config.masking_schedule
        if schedule not in MASKING_SCHEDULES:
            raise ValueError(
                f"diffusion.scheduler.masking_schedule={schedule!r} is not supported; use one of "
                f"{', '.join(MASKING_SCHEDULES)}"
            )
        if not 0.0 <= min_masking_rate < 1.0:
            raise ValueError(f"diffusion.min_masking_rate={min_masking_rate} must be in [0, 1)")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"diffusion.label_smoothing={label_smoothing} must be in [0, 1)")
        self.scheduler = scheduler
        self.mask_token_id = int(scheduler.config.mask_token_id)
        self.masking_schedule = schedule
        self.min_masking_rate, self.label_smoothing = float(min_masking_rate), float(label_smoothing)

    @classmethod
    def takes_sampler(cls, scheduler_class: type) -> bool:
        """Only iterative unmasking (`AmusedScheduler`)."""
        return issubclass(scheduler_class, AmusedScheduler)

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """The numbers of a masked-token run agree (`check_token_config`)."""
        check_token_config(cfg)

    def mask_fraction(self, r: torch.Tensor) -> torch.Tensor:
        """gamma(r) (B,): the fraction of tokens masked at masking time r, the scheduler's schedule."""
        gamma = torch.cos(r * math.pi / 2) if self.masking_schedule == "cosine" else 1.0 - r
        return gamma.clamp(min=self.min_masking_rate)

    def sample_timesteps(
        self, batch_size: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Masking times r (B,) uniform in [0, 1), float32."""
        where = generator.device if generator is not None else device
        return torch.rand((batch_size,), generator=generator, device=where).to(device)

    def draw_noise(self, shape: torch.Size, generator: torch.Generator | None = None) -> torch.Tensor:
        """u (B, h, w): uniform noise that picks which tokens are masked (on the generator's device)."""
        where = generator.device if generator is not None else "cpu"
        return torch.rand(tuple(shape), generator=generator, device=where)

    def mask(self, x0: torch.Tensor, r: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Which tokens are masked (B, h, w) bool: the n(r) tokens of each image with the smallest u."""
        B = x0.shape[0]
        length = x0[0].numel()
        n = (length * self.mask_fraction(r)).round().clamp(min=1)  # (B,)
        rank = u.reshape(B, -1).argsort(dim=-1).argsort(dim=-1)  # (B, h*w): the rank of each token's u
        return (rank < n[:, None]).view_as(x0)

    def loss(
        self,
        model: Backbone,
        x0: torch.Tensor,
        cond: torch.Tensor | None,
        t: torch.Tensor | None = None,
        eps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of `model` on masked token ids.

        Args:
            model: token backbone, model(ids, r, cond) -> logits (B, K, h, w).
            x0: token ids (B, h, w) int64.
            cond: class ids (B,), text features (B, L, D) or None.
            t: masking times r (B,); drawn when None.
            eps: the noise u (B, h, w) that picks the masked tokens; drawn when None.
            generator: RNG for r and u (fixed validation masks).

        Returns:
            The mean cross-entropy over all masked tokens of the batch (as aMUSEd), and the per-image mean over
            its masked tokens (B,).
        """
        if x0.is_floating_point():
            raise ValueError("masked-token training needs token ids (B, h, w); the autoencoder must be a VQ model")
        if t is None:
            t = self.sample_timesteps(x0.shape[0], x0.device, generator)
        if eps is None:
            eps = self.draw_noise(x0.shape, generator)
        masked = self.mask(x0, t.to(x0.device), eps.to(x0.device))  # (B, h, w)
        inputs = torch.where(masked, self.mask_token_id, x0)  # (B, h, w)
        logits = model(inputs, t, cond)  # (B, K, h, w)
        ce = F.cross_entropy(logits.float(), x0, reduction="none", label_smoothing=self.label_smoothing)  # (B, h, w)
        weight = masked.float()
        per_image = (ce * weight).flatten(1).sum(1) / weight.flatten(1).sum(1)  # (B,)
        return (ce * weight).sum() / weight.sum(), per_image.detach()


def check_token_run(backbone: Any, autoencoder: Any, objective: Objective) -> None:
    """Raise one line when the backbone, the autoencoder and the objective do not all read token ids (or all not),
    or when their numbers (codebook, mask id) differ: the config's declared numbers are checked before anything
    is built (`check_token_config`), these are the built objects' own (a `vae.codebook_size=null` skips the first).
    """
    tokens = [
        ("diffusion", objective.input_kind == "tokens", "diffusion=masked_tokens"),
        ("model", backbone.input_kind == "tokens", "model=uvit2d or uvit2d_tiny"),
        ("vae", autoencoder.output_kind == "tokens", "vae=vq_amused256, vq_local or vq_tiny"),
    ]
    if not any(is_token for _, is_token, _ in tokens):
        return
    if not all(is_token for _, is_token, _ in tokens):
        wrong = [key for key, is_token, _ in tokens if not is_token]
        need = "; ".join(what for _, _, what in tokens)
        verb = "is" if len(wrong) == 1 else "are"
        raise ValueError(f"a masked-token run needs {need}; {' and '.join(wrong)} {verb} not set for one")
    if backbone.codebook_size != autoencoder.codebook_size:
        raise ValueError(codebook_error(backbone.codebook_size, autoencoder.codebook_size, autoencoder.pretrained))
    if objective.mask_token_id != backbone.mask_token_id:
        raise ValueError(mask_id_error(objective.mask_token_id, backbone.vocab_size))


def codebook_error(model_codes: int, vq_codes: int, where: str) -> str:
    """The one-line error of a model codebook that is not the VQ model's."""
    return (
        f"model.codebook_size={model_codes} does not match the VQ model's codebook of {vq_codes} codes ({where}); "
        f"set model.codebook_size={vq_codes}"
    )


def mask_id_error(mask_id: int, vocab: int) -> str:
    """The one-line error of a mask id that is not the vocabulary's last id."""
    return (
        f"diffusion.scheduler.mask_token_id={mask_id} is not the model's mask id model.vocab_size - 1 = {vocab - 1}; "
        f"set diffusion.scheduler.mask_token_id={vocab - 1}"
    )


def check_token_config(cfg: Any) -> None:
    """The numbers of a masked-token run agree, checked on the composed config before anything is built: the
    model's codebook is the VQ model's (as declared by `vae.codebook_size`), the vocabulary has room for the mask
    id, and the mask id is the vocabulary's last.

    Raises:
        ValueError: one line naming the key, the value and what to set.
    """
    from omegaconf import OmegaConf

    from latentdiff.models.uvit2d import vocab_error

    keys = ("model.codebook_size", "vae.codebook_size", "model.vocab_size", "diffusion.scheduler.mask_token_id")
    codes, vq_codes, vocab, mask = (OmegaConf.select(cfg, k, default=None) for k in keys)
    if codes is not None and vq_codes is not None and int(codes) != int(vq_codes):
        raise ValueError(codebook_error(codes, vq_codes, "vae.codebook_size"))
    if codes is not None and vocab is not None and int(vocab) < int(codes) + 1:
        raise ValueError(vocab_error(vocab, codes))
    if mask is not None and vocab is not None and int(mask) != int(vocab) - 1:
        raise ValueError(mask_id_error(mask, vocab))
