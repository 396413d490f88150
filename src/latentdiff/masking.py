"""Masked-token training and sampling (MaskGIT, Chang et al. 2022; aMUSEd, Patil et al. 2024) around diffusers'
`AmusedScheduler`, for token backbones (`model=uvit2d`) on VQ token ids (`vae=vq_*`).

The schedule and the iterative unmasking come from `AmusedScheduler` (its `mask_token_id`, `masking_schedule`,
`set_timesteps` temperatures and `step`); this module writes what diffusers leaves to the training script, as
aMUSEd's `train_amused.py` does it, and the per-sample sampling loop.

Glossary:
    x0     token ids of the clean image (B, h, w) int64 in [0, K), K = codebook size
    m      the mask id, `mask_token_id` = vocab_size - 1 >= K
    r      masking time in [0, 1] (B,), uniform
    gamma  the masked fraction at r: cos(pi r / 2) (cosine schedule) or 1 - r (linear), at least min_masking_rate
    n      masked tokens per image: round(gamma * h * w), at least 1
    u      uniform noise (B, h, w): the tokens whose rank in u is below n are masked (a uniformly random subset
           of exactly n tokens, aMUSEd's `rand(...).argsort()`)
    w      classifier-free guidance weight on the logits: uncond + w * (cond - uncond), as aMUSEd's pipeline
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AmusedScheduler

from latentdiff.autoencoder import is_tokenizer
from latentdiff.diffusion import Generators, guided_output

MASKING_SCHEDULES = ("cosine", "linear")
UNMASK_OPTIONS = ("temperature", "starting_mask_ratio")  # sampler.step_kwargs of the unmasking loop


class MaskedTokens:
    """The masked-token objective: cross-entropy of the original ids at the masked positions.

    Args:
        scheduler: the `AmusedScheduler` whose `mask_token_id` and `masking_schedule` training uses (and whose
            config the sampler copies).
        min_masking_rate: lower bound of gamma (aMUSEd's `--min_masking_rate`, 0 by default).
        label_smoothing: of the cross-entropy (MaskGIT uses 0.1; aMUSEd 0).
    """

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

    def mask_fraction(self, r: torch.Tensor) -> torch.Tensor:
        """gamma(r) (B,): the fraction of tokens masked at masking time r, the scheduler's schedule."""
        gamma = torch.cos(r * math.pi / 2) if self.masking_schedule == "cosine" else 1.0 - r
        return gamma.clamp(min=self.min_masking_rate)

    def sample_timesteps(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None):
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
        model: Callable[..., torch.Tensor],
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


def check_token_run(backbone: Any, autoencoder: Any, objective: Any) -> None:
    """Raise one line when the backbone, the VQ model and the masked-token objective do not fit together."""
    tokens = [
        ("diffusion", isinstance(objective, MaskedTokens), "diffusion=masked_tokens"),
        ("model", backbone.input_kind == "tokens", "model=uvit2d or uvit2d_tiny"),
        ("vae", is_tokenizer(autoencoder), "vae=vq_amused256, vq_local or vq_tiny"),
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


def check_text_rows(backbone: Any, text_meta: dict | None, key: str) -> None:
    """A text-conditional token backbone reads the pooled embedding from the last feature row exactly when the
    store's text encoder wrote one there (`text_encoder.pooled=true`).

    Raises:
        ValueError: one line naming `model.pooled_text`, the store (`key`) and what to set.
    """
    if not getattr(backbone, "text_conditioning", False) or not text_meta:
        return
    stored = bool(text_meta.get("pooled"))
    if backbone.pooled_text != stored:
        held = "ends with the pooled embedding" if stored else "holds no pooled embedding (hidden states only)"
        raise ValueError(
            f"model.pooled_text={str(backbone.pooled_text).lower()} but {key}'s text features {held}; set "
            f"model.pooled_text={str(stored).lower()}"
            + ("" if stored else " or extract with text_encoder.pooled=true (aMUSEd: text_encoder=amused)")
        )


def codebook_error(model_codes: int, vq_codes: int, where: str) -> str:
    return (
        f"model.codebook_size={model_codes} does not match the VQ model's codebook of {vq_codes} codes ({where}); "
        f"set model.codebook_size={vq_codes}"
    )


def mask_id_error(mask_id: int, vocab: int) -> str:
    return (
        f"diffusion.scheduler.mask_token_id={mask_id} is not the model's mask id model.vocab_size - 1 = {vocab - 1}; "
        f"set diffusion.scheduler.mask_token_id={vocab - 1}"
    )


def check_token_config(cfg: Any) -> None:
    """The numbers of a masked-token run agree, checked on the composed config before anything is built: the
    model's codebook is the VQ model's (as declared by `vae.codebook_size`), the vocabulary has room for the mask
    id, the mask id is the vocabulary's last, and every sampler (`sampler`, the grid and FID callbacks) takes only
    the unmasking loop's options.

    Raises:
        ValueError: one line naming the key, the value and what to set.
    """
    from omegaconf import OmegaConf

    from latentdiff.models.uvit2d import vocab_error

    def get(key: str) -> Any:
        return OmegaConf.select(cfg, key, default=None)

    keys = ("model.codebook_size", "vae.codebook_size", "model.vocab_size", "diffusion.scheduler.mask_token_id")
    codes, vq_codes, vocab, mask = (get(k) for k in keys)
    if codes is not None and vq_codes is not None and int(codes) != int(vq_codes):
        raise ValueError(codebook_error(codes, vq_codes, "vae.codebook_size"))
    if codes is not None and vocab is not None and int(vocab) < int(codes) + 1:
        raise ValueError(vocab_error(vocab, codes))
    if mask is not None and vocab is not None and int(mask) != int(vocab) - 1:
        raise ValueError(mask_id_error(mask, vocab))
    samplers = {"sampler": get("sampler")}
    samplers.update({f"callbacks.{k}": v for k, v in (get("callbacks") or {}).items() if v and "step_kwargs" in v})
    for key, sampler in samplers.items():
        if sampler is not None:
            check_unmask_options(sampler.get("step_kwargs") or {}, sampler.get("guidance_interval"), key)


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
    model: Callable[..., torch.Tensor],
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
    """Iterative unmasking with `AmusedScheduler` from an all-mask image to token ids (aMUSEd's pipeline loop).

    Args:
        model: token backbone (usually the EMA copy), model(ids, t, cond) -> logits (B, K, h, w).
        scheduler: a sampling `AmusedScheduler`; its state is reset here.
        shape: (B, h, w) of the token grid.
        num_steps: unmasking steps.
        cond, null_cond, guidance_scale: as in `latentdiff.diffusion.guided_output` (on the logits).
        generator: one generator, or one per sample: then each sample's draws (the token choices and the Gumbel
            noise of the re-masking) depend only on its own generator, and `scheduler.step` runs per sample.
        temperature: Gumbel temperature of the re-masking, [start, end] linearly over the steps (aMUSEd: [2, 0]).
        starting_mask_ratio: scales the schedule's mask ratio (`AmusedScheduler.step`).

    Returns:
        Token ids (B, h, w) int64 in [0, K).
    """
    if num_steps < 1:
        raise ValueError(f"sampler.steps={num_steps} must be >= 1")
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
