"""What each key of a composed config allows: its type and range, in words a user reads in the error.

`RULES` holds the group keys (dotted keys); the constructors' type hints
give the types of every other argument (`latentdiff.signatures`). `ENTRY_RULES` holds the top-level keys of
each entry point. `latentdiff.validation.check_config` applies both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rule:
    """A key's type (a typing hint) and range (`test` on a value of that type), and the words for both."""

    hint: Any
    test: Callable[[Any], bool] | None = None
    allowed: str = ""


def _int(low: int) -> Rule:
    return Rule(int, lambda v: v >= low, "must be a positive integer" if low == 1 else f"must be an integer >= {low}")


def _one_of(*names: str) -> Rule:
    return Rule(str, lambda v: v in names, f"is not supported; use one of {', '.join(names)}")


def _num(test: Callable[[float], bool], allowed: str) -> Rule:
    return Rule(float, test, allowed)


POSITIVE_INT, NONNEG_INT = _int(1), _int(0)
POSITIVE = _num(lambda v: v > 0, "must be a number > 0")
NONNEG = _num(lambda v: v >= 0, "must be a number >= 0")
UNIT = _num(lambda v: 0 <= v < 1, "must be in [0, 1)")
OPEN_UNIT = _num(lambda v: 0 < v < 1, "must be in (0, 1)")
OPTIONAL_NONNEG = Rule(float | None, lambda v: v is None or v >= 0, "must be a number >= 0 (or null)")
PAIR = Rule(tuple[float, float], lambda v: all(0 <= b < 1 for b in v), "must be a pair [beta1, beta2], each in [0, 1)")

# ranges of the group keys (the constructors' type hints give the types; these rules add the ranges)
RULES: dict[str, Rule] = {
    "seed": NONNEG_INT,
    "model.img_size": POSITIVE_INT,
    "model.patch_size": POSITIVE_INT,
    "model.in_chans": POSITIVE_INT,
    "model.embed_dim": POSITIVE_INT,
    "model.depth": POSITIVE_INT,
    "model.num_heads": POSITIVE_INT,
    "model.mlp_ratio": POSITIVE,
    "model.num_clip_token": POSITIVE_INT,
    "model.clip_dim": Rule(int | None, lambda v: v is None or v >= 1, "must be an integer >= 1 (or null: no text)"),
    "model.sample_size": Rule(int, lambda v: v >= 1, "must be an integer >= 1"),
    "model.layers_per_block": POSITIVE_INT,
    "data.image_size": POSITIVE_INT,
    "data.batch_size": POSITIVE_INT,
    "data.num_train": POSITIVE_INT,
    "data.num_val": POSITIVE_INT,
    "data.num_workers": NONNEG_INT,
    "data.num_classes": NONNEG_INT,
    "data.latent_size": POSITIVE_INT,
    "data.latent_channels": POSITIVE_INT,
    "data.channels": POSITIVE_INT,
    "data.text_dim": POSITIVE_INT,
    "data.text_len": POSITIVE_INT,
    "vae.scaling_factor": Rule(float | None, lambda v: v is None or v > 0, "must be a number > 0 (or null)"),
    "diffusion.scheduler.num_train_timesteps": POSITIVE_INT,
    "diffusion.scheduler.beta_start": OPEN_UNIT,
    "diffusion.scheduler.beta_end": OPEN_UNIT,
    "diffusion.scheduler.shift": POSITIVE,
    "diffusion.min_snr_gamma": POSITIVE,
    "diffusion.logit_std": POSITIVE,
    "diffusion.min_masking_rate": UNIT,
    "diffusion.label_smoothing": UNIT,
    "sampler.steps": POSITIVE_INT,
    "sampler.guidance_scale": _num(lambda v: v >= 0, "must be a number >= 0 (1 = no guidance)"),
    "sampler.guidance_interval": Rule(
        tuple[float, float] | None,
        lambda v: v is None or 0 <= v[0] <= v[1],
        "must be [low, high] with 0 <= low <= high (training timesteps), or null",
    ),
    "optim.lr": _num(lambda v: v > 0, "must be > 0 (e.g. 2e-4)"),
    "optim.weight_decay": _num(lambda v: v >= 0, "must be >= 0"),
    "optim.warmup_steps": Rule(int, lambda v: v >= 0, "must be an integer >= 0"),
    "optim.betas": PAIR,
    "module.num_classes": NONNEG_INT,
    "module.p_uncond": _num(lambda v: 0 <= v < 1, "is outside [0, 1); use e.g. 0.1 (U-ViT, DiT) or 0 for no CFG"),
    "module.ema.decay": _num(lambda v: 0 <= v < 1, "must be in [0, 1) (e.g. 0.9999)"),
    "module.ema.update_every": POSITIVE_INT,
    "module.ema.start_step": NONNEG_INT,
    "module.nonfinite.max_skips": POSITIVE_INT,
    "trainer.max_steps": Rule(int, lambda v: v == -1 or v >= 1, "must be a positive integer (or -1)"),
    "trainer.accumulate_grad_batches": Rule(int, lambda v: v >= 1, "must be a positive integer"),
    "trainer.gradient_clip_val": Rule(
        float | None, lambda v: v is None or v >= 0, "must be >= 0 (0 or null disables clipping)"
    ),
    "trainer.log_every_n_steps": POSITIVE_INT,
    "trainer.num_nodes": POSITIVE_INT,
    "trainer.val_check_interval": Rule(
        float | None, lambda v: v is None or v > 0, "must be > 0 (optimizer steps, or a fraction of an epoch)"
    ),
    "trainer.limit_val_batches": Rule(float, lambda v: v >= 0, "must be >= 0 (batches, or a fraction)"),
    "trainer.devices": Rule(
        int | str | list[int],
        lambda v: v == "auto" or (isinstance(v, int) and (v >= 1 or v == -1)) or isinstance(v, list),
        "must be auto, a positive integer, -1 or a list of device ids",
    ),
    "callbacks.sample_grid.every_n_steps": Rule(int, lambda v: v >= 0, "must be an integer >= 0 (0: off)"),
    "callbacks.fid.every_n_steps": Rule(int, lambda v: v >= 0, "must be an integer >= 0 (0: off)"),
    "callbacks.loss_curve.every_n_steps": POSITIVE_INT,
    "callbacks.checkpoint.every_n_train_steps": Rule(int, lambda v: v >= 0, "must be an integer >= 0 (0: off)"),
    "callbacks.checkpoint.keep_last": Rule(int, lambda v: v >= -1, "must be an integer >= -1 (-1: keep all)"),
    "callbacks.checkpoint.every_n_minutes": OPTIONAL_NONNEG,
    "callbacks.sample_grid.samples_per_class": POSITIVE_INT,
    "callbacks.sample_grid.num_samples": POSITIVE_INT,
    "callbacks.sample_grid.max_classes": POSITIVE_INT,
    "callbacks.sample_grid.steps": POSITIVE_INT,
    "callbacks.fid.num_samples": POSITIVE_INT,
    "callbacks.fid.batch_size": POSITIVE_INT,
    "callbacks.fid.steps": POSITIVE_INT,
    "callbacks.loss_curve.smoothing": UNIT,
}

# the top-level keys of each entry point
ENTRY_RULES: dict[str, dict[str, Rule]] = {
    "train": {
        "name": Rule(
            str | int | float,
            lambda v: bool(str(v)) and "/" not in str(v) and str(v) not in (".", "..") and len(str(v)) <= 200,
            "must be a folder name (at most 200 characters, no '/')",
        ),
        "seed": NONNEG_INT,
        "resume": Rule(str | bool | None, None, "must be auto, a run directory, or null"),
        "ckpt_path": Rule(str | None, None, "must be a checkpoint file or null"),
        "objective": Rule(str | None, None, "must be a logged metric name (e.g. val/loss_ema) or null"),
        "matmul_precision": Rule(
            str | None, lambda v: v in (None, "highest", "high", "medium"), "must be highest, high, medium or null"
        ),
    },
    "sample": {
        "ckpt": Rule(str | None, None, "must be a checkpoint file or null"),
        "use_ema": Rule(bool, None, "must be true or false"),
        "num_samples": Rule(int, lambda v: v >= 1, "must be a positive integer"),
        "batch_size": Rule(int, lambda v: v >= 1, "must be a positive integer"),
        "seed": Rule(int, lambda v: v >= 0, "must be an integer >= 0"),
        "guidance_scale": Rule(
            float | None, lambda v: v is None or v >= 0, "must be a number >= 0 (CFG w; 1 = no guidance) or null"
        ),
        "labels": Rule(str | int | list[int], None, "must be uniform, balanced, a class id or a list of ids"),
        "prompts": Rule(str, None, "must be val, train or a latent store folder"),
        "out": Rule(str | None, None, "must be a folder or null"),
        "save_png": Rule(bool, None, "must be true or false"),
        "devices": Rule(int | str, lambda v: v == "auto" or (isinstance(v, int) and v >= 1), "must be auto or N >= 1"),
        "precision": _one_of("fp32", "bf16", "fp16"),
    },
    "evaluate": {
        "samples": Rule(str, None, "must be an .npz or an image folder"),
        "reference": Rule(str | None, None, "must be an .npz (statistics or images), an image folder or null"),
        "metrics": Rule(list[str], None, "must be a list, e.g. [fid,isc]"),
        "num_samples": Rule(int | None, lambda v: v is None or v >= 2, "must be an integer >= 2 (or null: all)"),
        "inception_weights": Rule(str | None, None, "must be a weights file or null"),
        "batch_size": Rule(int, lambda v: v >= 1, "must be >= 1"),
        "device": Rule(str, None, "must be auto, cpu or cuda[:N]"),
        "cache_dir": Rule(str | None, None, "must be a folder or null"),
        "write_stats": Rule(str | None, None, "must be an .npz path or null"),
        "out": Rule(str | None, None, "must be a .json path or null"),
        "fidelity.isc_splits": POSITIVE_INT,
        "fidelity.kid_subsets": POSITIVE_INT,
        "fidelity.kid_subset_size": POSITIVE_INT,
        "fidelity.kid_kernel": _one_of("poly", "rbf"),
        "fidelity.kid_kernel_poly_degree": POSITIVE_INT,
        "fidelity.prc_neighborhood": POSITIVE_INT,
        "fidelity.prc_batch_size": POSITIVE_INT,
        "fidelity.samples_shuffle": Rule(bool, None, "must be true or false"),
        "fidelity.rng_seed": NONNEG_INT,
    },
    "extract": {
        "out": Rule(str, None, "must be the folder of the new latent store"),
        "resolution": POSITIVE_INT,
        "shard_size": Rule(int, lambda v: v >= 1, "must be >= 1"),
        "flip": Rule(bool, None, "must be true or false"),
        "batch_size": Rule(int, lambda v: v >= 1, "must be >= 1"),
        "text_batch_size": Rule(int, lambda v: v >= 1, "must be >= 1"),
        "num_workers": Rule(int, lambda v: v >= 0, "must be >= 0"),
        "device": Rule(str, None, "must be auto, cpu or cuda[:N]"),
    },
    "export": {
        "ckpt": Rule(str, None, "must be a checkpoint file"),
        "out": Rule(str, None, "must be a new folder"),
        "use_ema": Rule(bool, None, "must be true or false"),
    },
}

# keys whose value may be infinite (none of the shipped configs; a hook for trainer.max_time-like options)

PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "transformer-engine")
RULES["trainer.precision"] = Rule(
    str | int, lambda v: str(v) in PRECISIONS, f"is not supported; use one of {', '.join(PRECISIONS)}"
)


def rule_for(key: str) -> Rule | None:
    """The rule of a dotted group key, if RULES has one."""
    return RULES.get(key)
