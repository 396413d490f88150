"""The LightningModule: backbone + EMA + frozen autoencoder + diffusion objective.

It receives built objects and partials (optimizer, LR schedule, EMA) from `run_training`; it never reads
a global config. The autoencoder is a submodule (so it moves between devices with the rest) but is
dropped from every state dict: checkpoints hold the backbone, the EMA copy, optimizer and schedule only.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import nn

from latentdiff.autoencoder import is_tokenizer
from latentdiff.data.order import generator_for
from latentdiff.distributed import shards_parameters
from latentdiff.ema import EMA
from latentdiff.objectives import FlowMatching, GaussianDiffusion
from latentdiff.samplers.cfg import null_condition

log = logging.getLogger(__name__)

_FROZEN_PREFIX = "autoencoder."


class DiffusionModule(L.LightningModule):
    """Trains a diffusion backbone on (latent) images, or a masked-token backbone on VQ token ids.

    Args:
        backbone: network with `forward(x, timesteps, cond)`.
        autoencoder: frozen `IdentityAutoencoder`, `FrozenAutoencoderKL` or `FrozenVQModel` (token ids).
        diffusion: the training objective around a diffusers scheduler (Gaussian diffusion, flow matching, or
            masked tokens: `latentdiff.masking.MaskedTokens`).
        optimizer: partial taking the parameters, e.g. `partial(torch.optim.AdamW, lr=2e-4)`.
        lr_scheduler: partial taking the optimizer, stepped every optimizer step; None keeps the LR fixed.
        ema: partial taking the backbone, e.g. `partial(EMA, decay=0.9999)`; None disables EMA.
        num_classes: classes the run conditions on; the null class id is `num_classes`. 0: class labels in
            the data are ignored (unconditional training); text features are always used.
        p_uncond: probability of replacing the condition by the null condition (for CFG), in [0, 1).
        compile: `torch.compile` the backbone: False, True, or a dict of `torch.compile` kwargs with an optional
            `scope`: "model" (default: the whole backbone's training forward, one graph) or "blocks" (each
            transformer/UNet block compiled in place, for training and sampling: shorter compile times, see
            `compile_regions`).
        run_config: the resolved run config (plain containers), stored in every checkpoint.
        val_seed: seed of the fixed noise and timesteps used for `val/loss`, so it compares across steps.
        seed: the run's seed. The training noise, timesteps, posterior draws and label dropout of a step come
            from a generator seeded by (seed, rank, step, batch index), so they do not depend on any RNG
            state: a resumed run draws exactly what the uninterrupted run draws.
        nonfinite: what to do with a step whose loss or gradient is NaN/Inf: `{"policy": "skip", "max_skips": K}`
            skips the update (weights, optimizer and EMA unchanged) and stops the run with an error after K
            consecutive skipped steps, before any checkpoint holds them; `{"policy": "stop"}` stops at the
            first; `{"policy": "off"}` checks nothing. With an optimizer that can skip a step on the device
            (fused AdamW/Adam/SGD: `found_inf`, as AMP's grad scaler uses) the check costs no host-device sync:
            the host learns of skipped steps at the next log step or checkpoint, whichever comes first.
    """

    def __init__(
        self,
        backbone: nn.Module,
        autoencoder: nn.Module,
        diffusion: GaussianDiffusion | FlowMatching,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        ema: Callable[[nn.Module], EMA] | None = None,
        num_classes: int = 0,
        p_uncond: float = 0.1,
        compile: bool | dict = False,
        run_config: dict | None = None,
        val_seed: int = 1234,
        seed: int = 0,
        nonfinite: dict | None = None,
    ):
        super().__init__()
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"module.p_uncond={p_uncond} is outside [0, 1); use e.g. 0.1 (U-ViT, DiT)")
        self.backbone = backbone
        self.autoencoder = autoencoder.requires_grad_(False).eval()
        self.ema = ema(backbone) if ema is not None else None
        self.diffusion = diffusion
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.num_classes, self.p_uncond = int(num_classes), float(p_uncond)
        self.compile_options = compile
        self.run_config = run_config
        self.val_seed, self.seed = val_seed, int(seed)
        self.guard = NonFiniteGuard(**(nonfinite or {}))
        self._step_loss_finite: torch.Tensor | None = None  # all micro-batch losses of this step finite
        self._step_indices: list[torch.Tensor] = []  # dataset indices of this step's micro-batches
        self._grad_norm = torch.zeros(())  # of this step's gradients, computed once for the guard and clipping
        self._update_ok: torch.Tensor | bool = True  # this step's update is applied (a device bool, or a host bool)
        self._rng_to_restore: dict | None = None
        self.register_buffer("null_text", None, persistent=False)  # set by text datamodules (empty prompt)
        self._train_forward: Callable = backbone
        self._compiled = False
        self._register_state_dict_hook(_drop_frozen_keys)
        self.register_load_state_dict_post_hook(_ignore_missing_frozen_keys)

    # ----------------------------------------------------------------------------------------- setup
    def configure_model(self) -> None:
        if not self.compile_options or self._compiled:
            return
        options = dict(self.compile_options) if isinstance(self.compile_options, dict) else {}
        scope = options.pop("scope", "model")
        if scope == "model":
            self._train_forward = torch.compile(self.backbone, **options)
        elif scope == "blocks":
            compile_blocks(self.backbone, **options)
        else:
            raise ValueError(f"module.compile.scope={scope!r} is not allowed; use one of 'model', 'blocks'")
        self._compiled = True

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.backbone.parameters())  # the EMA copy is never optimized
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train(self, mode: bool = True) -> DiffusionModule:
        super().train(mode)
        self.autoencoder.eval()  # frozen: Lightning calls .train() on the whole module each epoch
        return self

    # ------------------------------------------------------------------------------------ conditions
    def null_cond(self, cond: torch.Tensor | None) -> torch.Tensor | None:
        """The unconditional input shaped like `cond`: the null class id, or the empty-prompt features."""
        return null_condition(cond, self.num_classes, self.null_text)

    def batch_cond(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The condition the backbone sees: class ids, text features, or None (unconditional run)."""
        cond = batch.get("cond")
        if cond is None:
            return None
        if cond.is_floating_point():
            return cond.float()  # text features are stored in fp16; autocast picks the compute dtype
        return cond if self.num_classes > 0 else None  # class ids of an unconditional run are ignored

    def drop_cond(self, cond: torch.Tensor | None, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """Replace each condition by the null condition with probability `p_uncond` (CFG training)."""
        if cond is None or self.p_uncond == 0.0:
            return cond
        drop = torch.rand(cond.shape[0], device=cond.device, generator=generator) < self.p_uncond  # (B,)
        return torch.where(drop.view(-1, *[1] * (cond.dim() - 1)), self.null_cond(cond), cond)

    def latents(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents z (B, C, h, w) from a batch of images or of stored VAE moments; with a VQ tokenizer,
        token ids (B, h, w) from a batch of images or of stored ids."""
        if "tokens" in batch:
            return batch["tokens"]
        if is_tokenizer(self.autoencoder):
            if "image" not in batch:
                raise ValueError("the run's vae is a VQ model but the data holds VAE moments; use a token store")
            return self.autoencoder.encode_tokens(batch["image"])
        if "moments" in batch:
            return self.autoencoder.sample(batch["moments"], generator=generator)
        return self.autoencoder.sample(self.autoencoder.encode_moments(batch["image"]), generator=generator)

    # -------------------------------------------------------------------------------------- training
    def step_generator(self, batch_idx: int) -> torch.Generator:
        """The generator of one training micro-batch: a function of (seed, rank, step, batch index) only."""
        return generator_for(self.seed, self.global_rank, self.trainer.global_step, batch_idx, device=self.device)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        generator = self.step_generator(batch_idx)
        x0 = self.latents(batch, generator=generator)  # (B, C, h, w)
        cond = self.drop_cond(self.batch_cond(batch), generator)
        loss, _ = self.diffusion.loss(self._train_forward, x0, cond, generator=generator)
        finite = torch.isfinite(loss.detach())
        self._step_loss_finite = finite if self._step_loss_finite is None else self._step_loss_finite & finite
        if "index" in batch:
            self._step_indices.append(batch["index"].detach())
        # Only when the loggers write (Lightning's `log` costs ~1 ms of Python per call), and not prog_bar=True:
        # Lightning reads progress-bar values back to the host after every batch (a sync);
        # latentdiff.callbacks.ProgressBar shows train/loss, read only when the bar refreshes
        if self._logs_this_step():
            self.log("train/loss", loss, batch_size=x0.shape[0])
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.backbone.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())
        loss_finite, self._step_loss_finite = self._step_loss_finite, None
        indices, self._step_indices = self._step_indices, []
        self._update_ok = True
        if hasattr(optimizer, "found_inf") and not self._scaled_fp16:
            del optimizer.found_inf  # left by an earlier step of this module
        if self.guard.policy != "off":
            # verdict: 0 finite, 1 non-finite gradient, 2 non-finite loss; fp16 loss scaling produces Inf
            # gradients by design (the scaler skips those steps), so then only the loss is checked
            verdict = torch.zeros((), dtype=torch.int32, device=norm.device)
            if not self._scaled_fp16:
                verdict = torch.where(torch.isfinite(norm), verdict, 1)
            if loss_finite is not None:
                verdict = torch.where(loss_finite.to(verdict.device), verdict, 2)
            verdict = _all_ranks_max(verdict)  # a step skipped anywhere is skipped everywhere (weights stay equal)
            ok = verdict == 0
            batch = torch.cat(indices) if indices else None
            self.guard.record(self.trainer.global_step + 1, self.trainer.current_epoch, batch, verdict)
            if not self._scaled_fp16 and getattr(optimizer, "_step_supports_amp_scaling", False):
                optimizer.found_inf = (~ok).float()  # the fused kernels skip the update on the device
                self._update_ok = ok
            else:
                self.guard.flush()  # this optimizer cannot skip on the device: decide on the host now
                if not bool(ok):
                    for p in self.backbone.parameters():
                        p.grad = None  # the optimizer leaves parameters without gradients untouched
                    self._update_ok = False
        self._grad_norm = norm
        if self.trainer.global_step % max(self.trainer.log_every_n_steps, 1) == 0:
            self.log("train/grad_norm", norm, batch_size=1)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """`trainer.gradient_clip_val`, reusing the gradient norm of `on_before_optimizer_step` (one pass over the
        gradients instead of two, no sync), and allowed with fused optimizers (Lightning refuses those because
        under fp16 they unscale internally; `latentdiff.validation.validate_train_config` refuses that combination)."""
        if not gradient_clip_val:
            return
        params = [p for p in self.backbone.parameters() if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        elif shards_parameters(self.trainer):
            self.trainer.model.clip_grad_norm_(gradient_clip_val)  # FSDP: the norm over all shards
        elif params:
            # as torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6))
            coef = torch.clamp(gradient_clip_val / (self._grad_norm + 1e-6), max=1.0)
            torch._foreach_mul_([p.grad for p in params], coef.to(params[0].grad.device))

    def _logs_this_step(self) -> bool:
        """The loggers write at this step, or it is the run's last (so short runs still report train/loss)."""
        trainer = self.trainer
        last = trainer.max_steps > 0 and trainer.global_step + 1 >= trainer.max_steps
        return last or trainer._logger_connector.should_update_logs

    @property
    def _scaled_fp16(self) -> bool:
        return str(self.trainer.precision) == "16-mixed"  # the grad scaler owns optimizer.found_inf

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # Lightning calls this once per real optimizer step (after gradient accumulation)
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None and self._update_ok is not False:
            apply = self._update_ok if isinstance(self._update_ok, torch.Tensor) else None
            self.ema.update(self.backbone, self.trainer.global_step - 1, apply)  # global_step counts this step

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.guard.pending and self.trainer.global_step % max(self.trainer.log_every_n_steps, 1) == 0:
            self._flush_guard()

    def on_train_end(self) -> None:
        self.guard.flush()

    def _flush_guard(self) -> None:
        """Read the skipped-step record back (one sync per log interval), warn or stop as the policy says."""
        before = self.guard.total
        self.guard.flush()
        if self.guard.total != before:
            self.log("train/nonfinite_steps", float(self.guard.total), batch_size=1)

    # ------------------------------------------------------------------------------------ validation
    @torch.no_grad()
    def heldout_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Loss of `model` on a batch with noise, timesteps and posterior draws fixed by the batch index.

        `val/loss` uses it, so values at different steps (or of different runs) are comparable.
        """
        generator = torch.Generator(device="cpu").manual_seed(self.val_seed + batch_idx)
        x0 = self.latents(batch, generator=generator)  # the posterior draw uses the CPU generator
        t = self.diffusion.sample_timesteps(x0.shape[0], torch.device("cpu"), generator).to(self.device)
        eps = self.diffusion.draw_noise(x0.shape, generator).to(self.device)  # Gaussian eps, or masking noise u
        loss, _ = self.diffusion.loss(model, x0, self.batch_cond(batch), t=t, eps=eps)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        batch_size = len(next(iter(batch.values())))
        self.log(
            "val/loss",
            self.heldout_loss(self.backbone, batch, batch_idx),
            batch_size=batch_size,
            sync_dist=True,
        )
        if self.ema is not None:
            loss_ema = self.heldout_loss(self.ema.model, batch, batch_idx)
            self.log("val/loss_ema", loss_ema, batch_size=batch_size, sync_dist=True)

    # ---------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from latentdiff.utils import framework_versions

        self.guard.flush()  # a checkpoint never holds a state the policy stops at
        checkpoint["latentdiff"] = {
            "config": self.run_config,
            "versions": framework_versions(),
            "rng": rng_states(),
            "nonfinite": self.guard.state_dict(),
        }
        wandb = [lg for lg in (self.trainer.loggers if self._trainer else []) if isinstance(lg, WandbLogger)]
        if wandb:
            checkpoint["latentdiff"]["wandb_id"] = str(wandb[0].version)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("latentdiff", {})
        self.guard.load_state_dict(meta.get("nonfinite", {}))
        self._rng_to_restore = meta.get("rng")

    def on_train_start(self) -> None:
        """A resumed run continues the global RNG streams (torch, CUDA, numpy, python) where they were saved."""
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    @property
    def sampling_backbone(self) -> nn.Module:
        """The network to sample with: the EMA copy when there is one."""
        return self.ema.model if self.ema is not None else self.backbone


def _all_ranks_max(value: torch.Tensor) -> torch.Tensor:
    """The maximum of `value` over all ranks: a collective queued on the device, no host-device sync."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def compile_regions(backbone: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a backbone, each compiled on its own by `module.compile.scope=blocks`.

    The items of every `nn.ModuleList` and every `mid_block`, found from the top down without entering a
    block: U-ViT's in-blocks, mid block and out-blocks; a diffusers UNet's down, mid and up blocks.
    """
    regions: list[nn.Module] = []
    for name, child in backbone.named_children():
        if isinstance(child, nn.ModuleList):
            regions.extend(child)
        elif name == "mid_block" and child is not None:
            regions.append(child)
        else:
            regions.extend(compile_regions(child))
    return regions


def compile_blocks(backbone: nn.Module, **options: Any) -> list[nn.Module]:
    """`torch.compile` each of `compile_regions(backbone)` in place (state-dict keys do not change); returns them.

    Every block is its own compiled frame: dynamo's recompile limit (8 per code object) is raised to twice the
    number of blocks, or the blocks past the limit would silently run eager.
    """
    regions = compile_regions(backbone)
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 2 * len(regions))
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * config.recompile_limit)
    for region in regions:
        region.compile(**options)
    return regions


def _drop_frozen_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + _FROZEN_PREFIX)]:
        del state_dict[key]


def _ignore_missing_frozen_keys(module: nn.Module, incompatible_keys: Any) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not k.startswith(_FROZEN_PREFIX)]


class NonFiniteError(RuntimeError):
    """Training stopped on NaN/Inf; the message names the step, the epoch and the batch's dataset indices."""


class NonFiniteGuard:
    """Counts steps with a non-finite loss or gradient and decides when to stop (see `DiffusionModule`).

    Args:
        policy: "skip" (skip up to `max_skips` consecutive steps), "stop" (stop at the first), "off".
        max_skips: consecutive skipped steps allowed before the run stops.
    """

    POLICIES = ("skip", "stop", "off")

    def __init__(self, policy: str = "skip", max_skips: int = 5):
        if policy not in self.POLICIES:
            raise ValueError(
                f"module.nonfinite.policy={policy!r} is not allowed; use one of {', '.join(self.POLICIES)}"
            )
        if isinstance(max_skips, bool) or not isinstance(max_skips, int) or max_skips < 0:
            raise ValueError(f"module.nonfinite.max_skips={max_skips!r} must be an integer >= 0")
        self.policy, self.max_skips = policy, max_skips
        self.consecutive, self.total = 0, 0
        self._pending: list[tuple[int, int, torch.Tensor | None, torch.Tensor]] = []

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def record(self, step: int, epoch: int, indices: torch.Tensor | None, verdict: torch.Tensor) -> None:
        """Keep one step's verdict (a device int: 0 finite, 1 non-finite gradient, 2 non-finite loss) and its
        batch's dataset indices, to be read back by `flush`."""
        self._pending.append((step, epoch, indices, verdict))

    def flush(self) -> None:
        """Read the recorded verdicts back in one transfer and apply the policy to each step in order."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        verdicts = torch.stack([v.reshape(()) for *_, v in pending]).tolist()
        for (step, epoch, indices, _), verdict in zip(pending, verdicts, strict=True):
            if verdict == 0:
                self.finite()
            else:
                what = "loss" if verdict == 2 else "gradient"
                self.nonfinite(what, step, epoch, [] if indices is None else indices.tolist())

    def nonfinite(self, what: str, step: int, epoch: int, indices: list[int]) -> None:
        """Record a bad step; raise `NonFiniteError` when the policy says stop."""
        self.consecutive += 1
        self.total += 1
        shown = ", ".join(map(str, indices[:16])) + (", ..." if len(indices) > 16 else "")
        where = f"non-finite {what} at step {step} (epoch {epoch}, dataset indices [{shown}])"
        if self.policy == "stop" or self.consecutive > self.max_skips:
            limit = "" if self.policy == "stop" else f" after {self.max_skips} consecutive skipped steps"
            raise NonFiniteError(
                f"{where}: training stopped{limit} (module.nonfinite.policy={self.policy}); the last checkpoint "
                "holds the last good state -- lower optim.lr, check the data, or raise module.nonfinite.max_skips"
            )
        log.warning("%s: update skipped (%d of %d consecutive allowed)", where, self.consecutive, self.max_skips)

    def finite(self) -> None:
        self.consecutive = 0

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive, self.total = int(state.get("consecutive", 0)), int(state.get("total", 0))


def rng_states() -> dict[str, Any]:
    """The global RNG states (torch, CUDA, numpy, python) as tensors and plain containers (weights_only-safe)."""
    _kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` saved (the CUDA states only when the device count matches)."""
    torch.set_rng_state(states["torch"].cpu())
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
