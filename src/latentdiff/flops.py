"""Parameters and forward multiply-accumulates (GMACs per image) of a backbone or a model config.

    python -m latentdiff.flops model=uvit_l2 data=imagenet256_latents vae=sd_ema
    model=UViT params=286.8M gmacs=76.5 input=4x32x32

Any `conf/train.yaml` override works (`model.depth=12`, `data.image_size=512` ...); `json=true` prints one
JSON line instead (with the FLOPs of each aten op); a comma list of options (`model=uvit_l2,uvit_h2`) prints
one line per combination. Nothing is trained, loaded or written.

The count is torch's own (`torch.utils.flop_counter.FlopCounterMode`): the matmuls and convolutions of one
forward, attention's score and value products (2 N^2 D per block) included; normalisations, activations,
additions and biases are not counted. A MAC is 2 FLOPs, as in the U-ViT and DiT papers' "GFLOPs" (which
are MACs): U-ViT-L/2 at 256 gives 76.5 and U-ViT-H/2 133.2, the published figures. The backbone is built
and run on the meta device (no memory, no weights); a model whose forward cannot run on meta tensors is
counted on an uninitialised CPU copy with batch 1.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from latentdiff.errors import ConfigError
from latentdiff.models.contract import Backbone

# The text length a text-conditional UNet is counted with when the config names none (CLIP's 77 tokens).
DEFAULT_TEXT_LEN = 77


@dataclass(frozen=True)
class ModelCost:
    """What one forward of a backbone costs.

    Attributes:
        params: number of parameters (shared ones once).
        gmacs: multiply-accumulates of one forward, per image, in units of 1e9 (= FLOPs / 2 / 1e9).
        flops_by_op: FLOPs per image (2 per MAC) by aten op, e.g. {"aten.addmm": ..., "aten.bmm": ...}.
        model: the backbone's class name.
        input_shape: (C, H, W) of the input it was counted on.
    """

    params: int
    gmacs: float
    flops_by_op: dict[str, int] = field(default_factory=dict, compare=False)
    model: str = ""
    input_shape: tuple[int, ...] = ()

    @property
    def macs(self) -> int:
        """Multiply-accumulates per image (exact: half the counted FLOPs)."""
        return sum(self.flops_by_op.values()) // 2

    def summary(self) -> str:
        """One line: `model=UViT params=286.8M gmacs=76.5 input=4x32x32`."""
        shape = "x".join(str(s) for s in self.input_shape)
        return f"model={self.model} params={_fmt(self.params / 1e6)}M gmacs={_fmt(self.gmacs)} input={shape}"

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready record of every field."""
        return {
            "model": self.model,
            "params": self.params,
            "gmacs": self.gmacs,
            "input": list(self.input_shape),
            "flops_by_op": dict(self.flops_by_op),
        }


def _fmt(value: float) -> str:
    """At least three significant digits and at least one decimal: 76.5, 133.2, 5.60, 0.123, 0.0123."""
    if value <= 0:
        return "0.0"
    return f"{value:.{max(1, 2 - math.floor(math.log10(value)))}f}"


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def dummy_cond(
    model: nn.Module,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    text_len: int = DEFAULT_TEXT_LEN,
) -> torch.Tensor | None:
    """A zero condition of the kind `model.forward(x, t, cond)` takes (`Backbone.dummy_cond`), on the model's
    device and in its float type unless `device` is given; None for an unconditional model (and for a module
    that is not a `Backbone`: counted unconditionally)."""
    if not isinstance(model, Backbone):
        return None
    default_device, dtype = _device_and_dtype(model)
    device = torch.device(device) if device is not None else default_device
    return model.dummy_cond(batch_size, device, dtype, text_len)


def _count(
    model: nn.Module, input_shape: tuple[int, ...], cond: torch.Tensor | None, batch_size: int, device: torch.device
) -> dict[str, int]:
    """FLOPs of one forward of a batch, by aten op."""
    from torch.utils.flop_counter import FlopCounterMode

    _, dtype = _device_and_dtype(model)
    if isinstance(model, Backbone) and model.input_kind == "tokens":  # a token backbone (UVit2D) reads ids (B, h, w)
        x = torch.zeros(batch_size, *input_shape[-2:], device=device, dtype=torch.long)
    else:
        x = torch.zeros(batch_size, *input_shape, device=device, dtype=dtype)
    t = torch.zeros(batch_size, device=device)
    if cond is not None:
        cond = cond.to(device)
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(x, t, cond)
    finally:
        model.train(was_training)
    return {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}


def _meta_unsupported(err: Exception) -> bool:
    """Whether a forward failed because its tensors are on the meta device (not a mistake in the model)."""
    return isinstance(err, NotImplementedError) or "meta" in str(err).lower()


def model_cost(
    model: nn.Module,
    input_shape: tuple[int, ...],
    cond: torch.Tensor | None = None,
    batch_size: int = 1,
) -> ModelCost:
    """Count the parameters and the forward MACs of `model(x, timesteps, cond)`, x of shape (B, *input_shape).

    The forward runs under `torch.no_grad()` in eval mode on the model's device: build the model under
    `torch.device("meta")` (or `.to("meta")` it) to count it without memory or time. If a meta model's
    forward needs real values, an uninitialised CPU copy is run with batch 1 instead.

    Args:
        model: a backbone with the contract `forward(x, timesteps, cond=None)`.
        input_shape: (C, H, W) of one input; (h, w) of a token backbone's ids.
        cond: the condition, batched like the input; None: `dummy_cond(model)` (None when unconditional).
        batch_size: images in the counted forward; the result is per image.
    Returns:
        The per-image cost.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    input_shape = tuple(int(s) for s in input_shape)
    params = sum(p.numel() for p in model.parameters())
    device, _ = _device_and_dtype(model)
    if cond is None:
        cond = dummy_cond(model, batch_size, device)
    try:
        flops = _count(model, input_shape, cond, batch_size, device)
    except (NotImplementedError, RuntimeError) as err:
        if device.type != "meta" or not _meta_unsupported(err):
            raise
        cpu_model = copy.deepcopy(model).to_empty(device="cpu")  # values do not matter, shapes do
        batch_size = 1
        flops = _count(cpu_model, input_shape, None if cond is None else cond[:1], 1, torch.device("cpu"))
    per_image = {op: n // batch_size for op, n in sorted(flops.items())}
    gmacs = sum(flops.values()) / 2 / 1e9 / batch_size
    return ModelCost(
        params=params, gmacs=gmacs, flops_by_op=per_image, model=type(model).__name__, input_shape=input_shape
    )


def config_cost(cfg: DictConfig) -> ModelCost:
    """The cost of the backbone of a composed training config (`conf/train.yaml`), built on the meta device.

    The input is `data.latent_channels x data.latent_size x data.latent_size`; `model.pretrained` is ignored
    (no weights are read); text features are `data.text_len` tokens long (77 when the data has none).

    Raises:
        ConfigError: the model cannot be built from the config (one line naming the key).
    """
    from latentdiff.models.build import build_backbone

    with _config_errors():
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
        model_cfg["pretrained"] = None
        channels, size = int(cfg.data.latent_channels), int(cfg.data.latent_size)
        text_len = OmegaConf.select(cfg, "data.text_len", default=None) or DEFAULT_TEXT_LEN
        with torch.device("meta"):
            backbone = build_backbone(OmegaConf.create(model_cfg))
    cond = dummy_cond(backbone, 1, "meta", int(text_len))
    shape = (size, size) if backbone.input_kind == "tokens" else (channels, size, size)  # ids: (h, w)
    with _config_errors():
        return model_cost(backbone, shape, cond)


@contextlib.contextmanager
def _config_errors() -> Iterator[None]:
    """Errors of a config that cannot be built or run, as one-line `ConfigError`s (also OmegaConf's)."""
    from omegaconf.errors import OmegaConfBaseException

    from latentdiff.errors import user_errors

    try:
        with user_errors():
            yield
    except OmegaConfBaseException as err:
        from latentdiff.cli import hydra_error_line

        raise ConfigError(hydra_error_line(err)) from err


def compose_train(overrides: list[str]) -> DictConfig:
    """Compose `conf/train.yaml` with `overrides` as `train.py` would (no run directory, nothing written)."""
    from latentdiff.cli import CONF_DIR, compose, hydra_error_line
    from latentdiff.config import register_resolvers

    register_resolvers()
    try:
        return compose(CONF_DIR, "train", list(overrides), hydra=False)
    except Exception as err:  # Hydra's override and composition errors
        raise ConfigError(hydra_error_line(err)) from None


def _expand(overrides: list[str]) -> list[list[str]]:
    """Sweep overrides (`model=uvit_l2,uvit_h2`, `range(...)`) to the list of their combinations."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:
        from latentdiff.cli import hydra_error_line

        raise ConfigError(hydra_error_line(err)) from None
    choices = []
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override():
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    return [list(combo) for combo in itertools.product(*choices)]


def _parse_bool(arg: str) -> bool:
    value = arg.split("=", 1)[1].strip().lower()
    if value not in ("true", "false"):
        raise ConfigError(f"{arg} is not allowed; use json=true or json=false")
    return value == "true"


def run(argv: list[str]) -> list[ModelCost]:
    """Print the cost of the config `argv` composes (one line per combination of a sweep); return them."""
    from latentdiff.cli import CONF_DIR
    from latentdiff.config import check_group_choices

    as_json, overrides = False, []
    for arg in argv:
        if arg == "--json":
            as_json = True
        elif arg.startswith("json="):
            as_json = _parse_bool(arg)
        elif arg in ("-m", "--multirun"):  # comma lists are expanded anyway
            continue
        else:
            overrides.append(arg)
    check_group_choices(overrides, CONF_DIR)
    jobs = _expand(overrides)
    costs = []
    for job in jobs:
        cost = config_cost(compose_train(job))
        costs.append(cost)
        if as_json:
            print(json.dumps({**cost.as_dict(), "overrides": job}), flush=True)
        else:
            print(cost.summary() + (f"  ({' '.join(job)})" if len(jobs) > 1 else ""), flush=True)
    return costs


def main(argv: list[str] | None = None) -> None:
    """`python -m latentdiff.flops [train.yaml overrides] [json=true]`; a config mistake is one line, exit 2."""
    from latentdiff.cli import plain_entry

    plain_entry(run, argv, __doc__)


if __name__ == "__main__":
    main()
