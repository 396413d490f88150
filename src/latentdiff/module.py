"""The LightningModule: backbone + EMA + frozen autoencoder + diffusion objective.

It receives built objects and partials (optimizer, LR schedule, EMA) from `run_training`; it never reads
a global config. The autoencoder is a submodule (so it moves between devices with the rest) but is
dropped from every state dict: checkpoints hold the backbone, the EMA copy, optimizer and schedule only.
Beside it: the non-finite guard (`guard`), `torch.compile` of the backbone (`compile`), the RNG states of a
checkpoint (`rng`). The ranges of the arguments are checked with the run config (`latentdiff.rules`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

from latentdiff.compile import compile_backbone
from latentdiff.data.order import generator_for
from latentdiff.ema import EMA
from latentdiff.guard import NonFiniteGuard, clip_gradients, grad_norm
from latentdiff.lightning_internals import attached_trainer, logs_this_step
from latentdiff.loggers import wandb_run_id
from latentdiff.objectives import FlowMatching, GaussianDiffusion
from latentdiff.rng import rng_states, set_rng_states
from latentdiff.samplers.cfg import drop_condition, null_condition
from latentdiff.strategies import shards_parameters

_FROZEN_PREFIX = "autoencoder."


class DiffusionModule(L.LightningModule):
    """Trains a diffusion backbone on (latent) images, or a masked-token backbone on VQ token ids.

    Args:
        backbone: network with `forward(x, timesteps, cond)`.
        autoencoder: frozen `IdentityAutoencoder`, `FrozenAutoencoderKL` or `FrozenVQModel` (token ids).
        diffusion: the training objective around a diffusers scheduler (Gaussian diffusion, flow matching, or
            masked tokens: `latentdiff.objectives.masked_tokens.MaskedTokens`).
        optimizer: partial taking the parameters, e.g. `partial(torch.optim.AdamW, lr=2e-4)`.
        lr_scheduler: partial taking the optimizer, stepped every optimizer step; None keeps the LR fixed.
        ema: partial taking the backbone, e.g. `partial(EMA, decay=0.9999)`; None disables EMA.
        num_classes: classes the run conditions on; the null class id is `num_classes`. 0: class labels in
            the data are ignored (unconditional training); text features are always used.
        p_uncond: probability of replacing the condition by the null condition (for CFG), in [0, 1).
        compile: `torch.compile` the backbone: False, True, or a dict of `torch.compile` kwargs with an optional
            `scope` ("model" or "blocks"; see `latentdiff.compile.compile_backbone`).
        run_config: the resolved run config (plain containers), stored in every checkpoint.
        val_seed: seed of the fixed noise and timesteps used for `val/loss`, so it compares across steps.
        seed: the run's seed. The training noise, timesteps, posterior draws and label dropout of a step come
            from a generator seeded by (seed, rank, step, batch index), so they do not depend on any RNG
            state: a resumed run draws exactly what the uninterrupted run draws.
        nonfinite: what to do with a step whose loss or gradient is NaN/Inf, the `NonFiniteGuard` arguments:
            `{"policy": "skip", "max_skips": K}` skips the update (weights, optimizer and EMA unchanged) and stops
            after K consecutive skipped steps; `{"policy": "stop"}` stops at the first; `{"policy": "off"}`.
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
        self._grad_norm = torch.zeros(())  # of this step's gradients, computed once for the guard and clipping
        self._update_ok: torch.Tensor | bool = True  # this step's update is applied (a device bool, or a host bool)
        self._rng_to_restore: dict | None = None
        self.register_buffer("null_text", None, persistent=False)  # set by text datamodules (empty prompt)
        self._train_forward: Callable = backbone
        self._compiled = False
        self.register_state_dict_post_hook(_drop_frozen_keys)
        self.register_load_state_dict_post_hook(_ignore_missing_frozen_keys)

    # ----------------------------------------------------------------------------------------- setup
    def configure_model(self) -> None:
        if self.compile_options and not self._compiled:
            self._train_forward = compile_backbone(self.backbone, self.compile_options)
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

    # -------------------------------------------------------------------------------------- training
    def step_generator(self, batch_idx: int) -> torch.Generator:
        """The generator of one training micro-batch: a function of (seed, rank, step, batch index) only."""
        return generator_for(self.seed, self.global_rank, self.trainer.global_step, batch_idx, device=self.device)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        generator = self.step_generator(batch_idx)
        x0 = self.autoencoder.model_input(batch, generator)  # latents (B, C, h, w), or VQ token ids (B, h, w)
        cond = drop_condition(self.batch_cond(batch), self.null_cond, self.p_uncond, generator)  # CFG training
        loss, _ = self.diffusion.loss(self._train_forward, x0, cond, generator=generator)
        self.guard.observe(loss, batch.get("index"))
        # Only when the loggers write (Lightning's `log` costs ~1 ms of Python per call) or at the run's last step
        # (short runs still report it), and not prog_bar=True: Lightning reads progress-bar values back to the
        # host after every batch (a sync); latentdiff.callbacks.ProgressBar reads it only when the bar refreshes
        last = self.trainer.max_steps > 0 and self.trainer.global_step + 1 >= self.trainer.max_steps
        if last or logs_this_step(self.trainer):
            self.log("train/loss", loss, batch_size=x0.shape[0])
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        norm = grad_norm([p.grad for p in self.backbone.parameters() if p.grad is not None])
        fp16 = str(self.trainer.precision) == "16-mixed"  # loss scaling: the grad scaler owns optimizer.found_inf
        step, epoch = self.trainer.global_step + 1, self.trainer.current_epoch
        self._update_ok = self.guard.check_step(norm, optimizer, self.backbone.parameters(), step, epoch, fp16)
        self._grad_norm = norm
        if self.trainer.global_step % max(self.trainer.log_every_n_steps, 1) == 0:
            self.log("train/grad_norm", norm, batch_size=1)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """`trainer.gradient_clip_val` with the norm of `on_before_optimizer_step`, also for fused optimizers
        (Lightning refuses those as under fp16 they unscale internally; `validate_train_config` refuses that)."""
        sharded = self.trainer.model if shards_parameters(self.trainer) else None  # FSDP: the norm over all shards
        clip_gradients(self.backbone.parameters(), gradient_clip_val, gradient_clip_algorithm, self._grad_norm, sharded)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # Lightning calls this once per real optimizer step (after gradient accumulation)
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None and self._update_ok is not False:
            apply = self._update_ok if isinstance(self._update_ok, torch.Tensor) else None
            self.ema.update(self.backbone, self.trainer.global_step - 1, apply)  # global_step counts this step

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # the skipped-step record is read back once per log interval (one sync): warn or stop as the policy says
        log_step = self.trainer.global_step % max(self.trainer.log_every_n_steps, 1) == 0
        if self.guard.pending and log_step and self.guard.flush():
            self.log("train/nonfinite_steps", float(self.guard.total), batch_size=1)

    def on_train_end(self) -> None:
        self.guard.flush()

    # ------------------------------------------------------------------------------------ validation
    @torch.no_grad()
    def heldout_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Loss of `model` on a batch with noise, timesteps and posterior draws fixed by the batch index.

        `val/loss` uses it, so values at different steps (or of different runs) are comparable.
        """
        generator = torch.Generator(device="cpu").manual_seed(self.val_seed + batch_idx)
        x0 = self.autoencoder.model_input(batch, generator)  # the posterior draw uses the CPU generator
        return self.diffusion.heldout_loss(model, x0, self.batch_cond(batch), generator)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        batch_size = len(next(iter(batch.values())))
        models = {"val/loss": self.backbone, **({"val/loss_ema": self.ema.model} if self.ema is not None else {})}
        for name, model in models.items():
            self.log(name, self.heldout_loss(model, batch, batch_idx), batch_size=batch_size, sync_dist=True)

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
        run_id = wandb_run_id(attached_trainer(self))
        if run_id is not None:
            checkpoint["latentdiff"]["wandb_id"] = run_id

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


def _drop_frozen_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + _FROZEN_PREFIX)]:
        del state_dict[key]


def _ignore_missing_frozen_keys(module: nn.Module, incompatible_keys: Any) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not k.startswith(_FROZEN_PREFIX)]
