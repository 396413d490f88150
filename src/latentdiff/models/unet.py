"""Thin adapters from diffusers UNets to the backbone contract `forward(x, timesteps, cond) -> like x`.

`UNet` wraps `diffusers.UNet2DModel` (unconditional or class-conditional); `UNetCond` wraps
`diffusers.UNet2DConditionModel` (text features through cross-attention). Both take every argument of the
wrapped diffusers constructor by its diffusers name (`conf/model/unet*.yaml` list them all, with their
defaults) and keep the diffusers model in `self.unet`, so `save_pretrained` / `from_pretrained` write and
read ordinary diffusers folders (state-dict keys are `unet.<diffusers key>`).

Null class: by project convention the last embedding row (`num_class_embeds - 1`) is the null class of
classifier-free guidance (see `ld.with_null`), so `cond=None` on a class-conditional `UNet` means "the null
class". `num_class_embeds <= 0` (the resolver's value for "no classes") means no class embedding.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import ModelMixin, UNet2DConditionModel, UNet2DModel
from torch import nn

from latentdiff.models.contract import Backbone
from latentdiff.utils import artefact_not_loaded


def _as_plain(value: Any) -> Any:
    """Lists for nested sequences (e.g. OmegaConf's ListConfig), as diffusers writes them to config.json."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_as_plain(v) for v in value]
    return value


def _check_kwargs(cls: type[ModelMixin], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Validate diffusers constructor arguments with one-line errors naming the key; return them cleaned."""
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
    for key in kwargs:
        if key not in defaults:
            raise ValueError(f"model.{key} is not an argument of diffusers.{cls.__name__}; see conf/model/")
    kwargs = {k: _as_plain(v) for k, v in kwargs.items()}
    if kwargs.get("num_class_embeds") is not None and kwargs["num_class_embeds"] <= 0:
        kwargs["num_class_embeds"] = None  # ld.with_null gives -1 for "no classes"; diffusers wants None
    get = lambda key: kwargs.get(key, defaults[key])

    channels, groups = list(get("block_out_channels")), get("norm_num_groups")
    if groups is not None and any(c % groups for c in channels):
        raise ValueError(f"model.norm_num_groups={groups} must divide each of model.block_out_channels={channels}")
    head_dim = get("attention_head_dim") if cls.__name__ == "UNet2DModel" else None  # the 2D UNet's head width
    if isinstance(head_dim, int):
        attended = [c for c, kind in zip(channels, get("down_block_types"), strict=False) if kind.startswith("Attn")]
        ups = zip(reversed(channels), get("up_block_types"), strict=False)
        attended += [c for c, kind in ups if kind.startswith("Attn")]
        attended += [channels[-1]] if get("add_attention") else []  # the middle block's attention
        if any(c % head_dim for c in attended):
            raise ValueError(
                f"model.attention_head_dim={head_dim} must divide the channels of every block with attention "
                f"({sorted(set(attended))} of model.block_out_channels={channels}); e.g. model.attention_head_dim="
                f"{math.gcd(*attended)}"
            )
    size, factor = get("sample_size"), 2 ** (len(get("down_block_types")) - 1)
    if any(s % factor for s in ([size] if isinstance(size, int) else size or [])):
        raise ValueError(
            f"model.sample_size={size} is not divisible by {factor} (2^(number of down blocks - 1)); "
            "change data.latent_size or use fewer model.down_block_types/up_block_types"
        )
    return kwargs


class _DiffusersUNet(Backbone):
    """Shared glue: build or load the diffusers model; timesteps to (B,); class ids with the null class."""

    diffusers_cls: ClassVar[type[ModelMixin]]
    export_folder = "unet"

    def __init__(self, gradient_checkpointing: bool = False, channels_last: bool = False, **unet_kwargs: Any) -> None:
        super().__init__()
        self.unet = self.diffusers_cls(**_check_kwargs(self.diffusers_cls, unet_kwargs))
        self.channels_last = bool(channels_last)
        self._set_options(self.unet, gradient_checkpointing)

    def _set_options(self, unet: ModelMixin, gradient_checkpointing: bool) -> None:
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if self.channels_last:
            unet.to(memory_format=torch.channels_last)  # NHWC weights: what cuDNN's tensor-core convs run on

    @classmethod
    def from_pretrained(
        cls, path: str | Path, gradient_checkpointing: bool = False, channels_last: bool = False, **kwargs: Any
    ) -> _DiffusersUNet:
        """Load a diffusers folder: a local path or a hub id; `kwargs` go to diffusers' `from_pretrained`."""
        unet = cls.diffusers_cls.from_pretrained(path, **kwargs)
        config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
        with torch.device("meta"):  # checks the config without allocating a second copy of the weights
            model = cls(channels_last=channels_last, **config)
        model.unet = unet
        model._set_options(unet, gradient_checkpointing)
        return model

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def save_pretrained(self, path: str | Path, **kwargs: Any) -> None:
        """Write a diffusers folder (config.json + safetensors weights) that `from_pretrained` reads."""
        self.unet.save_pretrained(path, **kwargs)

    def save_diffusers(self, folder: Path, model_cfg: dict[str, Any]) -> tuple[str, str]:
        """An ordinary diffusers folder of the wrapped UNet (what `diffusers.<class>.from_pretrained` reads)."""
        self.unet.save_pretrained(folder, safe_serialization=True)
        return "diffusers", type(self.unet).__name__

    def wrap_exported(self, module: nn.Module) -> None:
        """Wrap the diffusers UNet that an export's pipeline loaded (with this wrapper's options)."""
        if not isinstance(module, self.diffusers_cls):
            wanted, got = self.diffusers_cls.__name__, type(module).__name__
            raise TypeError(f"{type(self).__name__} wraps a {wanted}, not a {got}")
        self.unet = module
        self._set_options(module, False)

    def load_diffusers(
        self, folder: Path, key: str = "model.pretrained", value: str | None = None
    ) -> dict[str, torch.Tensor]:
        """The state dict of a diffusers folder of the wrapped UNet class, keyed `unet.<diffusers key>`."""
        try:
            unet = self.diffusers_cls.from_pretrained(folder)
        except (OSError, ValueError) as err:
            raise artefact_not_loaded(key, value or str(folder), err) from None
        return {f"unet.{k}": v for k, v in unet.state_dict().items()}

    def dummy_cond(
        self, batch_size: int, device: torch.device | str, dtype: torch.dtype, text_len: int
    ) -> torch.Tensor | None:
        """Class ids when the UNet has a class table it reads from ids (not a timestep-like embedding)."""
        config = self.unet.config
        if self.unet.class_embedding is not None and config.get("class_embed_type") in (None, "timestep"):
            return torch.zeros(batch_size, dtype=torch.long, device=device)
        return None

    @property
    def condition(self) -> str:
        """What `cond` is (the backbone contract): "class" with a class table, else "none"."""
        return "class" if self.null_class is not None else "none"

    @property
    def class_rows(self) -> int:
        """Rows of the class table (the classes and the null class); 0 without one."""
        return int(self.null_class) + 1 if self.null_class is not None else 0

    @property
    def null_class(self) -> int | None:
        """Index of the null class (the last row of the class table), or None without a class table."""
        n = self.unet.config.num_class_embeds
        return n - 1 if n is not None and self.unet.config.class_embed_type is None else None

    def _timesteps(self, x: torch.Tensor, timesteps: torch.Tensor | float) -> torch.Tensor:
        # as_tensor keeps fractional t: diffusers would cast a Python float to long
        t = torch.as_tensor(timesteps, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t  # (B,)
        if t.shape != (x.shape[0],):
            raise ValueError(f"timesteps must be a scalar or (B,)=({x.shape[0]},), got {tuple(t.shape)}")
        return t

    def _class_labels(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
        B = x.shape[0]
        if labels is None:
            return None if self.null_class is None else x.new_full((B,), self.null_class, dtype=torch.long)
        if self.unet.class_embedding is None:
            raise ValueError("got class ids but the model has no class embedding (model.num_class_embeds)")
        if labels.shape != (B,) or labels.is_floating_point():
            got = f"{labels.dtype} {list(labels.shape)}"
            raise ValueError(f"class ids must be integers shaped (B,)=({B},), got {got}")
        return labels  # (B,)


class UNet(_DiffusersUNet):
    """`diffusers.UNet2DModel` as a backbone: unconditional, or class-conditional with `num_class_embeds`.

    Args:
        gradient_checkpointing: Recompute block activations in the backward pass to save memory.
        channels_last: Keep weights and activations in NHWC memory order (same outputs; faster convolutions
            on GPUs with tensor cores, measured by `bench/train.py`).
        **unet_kwargs: Any `UNet2DModel` constructor argument, by its diffusers name.
    """

    diffusers_cls = UNet2DModel

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor | float, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict the diffusion target for a noisy input.

        Args:
            x: (B, C, H, W) noisy input; H and W divisible by 2^(number of down blocks - 1).
            timesteps: (B,) or a scalar, in the schedule's units (e.g. 0..999); integers or fractions.
            cond: (B,) long class ids, or None (the null class of a class-conditional model).

        Returns:
            (B, out_channels, H, W) prediction.
        """
        factor = 2 ** (len(self.unet.down_blocks) - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            size = tuple(x.shape[-2:])
            raise ValueError(f"input size {size} is not divisible by {factor}; see model.sample_size")
        t = self._timesteps(x, timesteps)  # (B,)
        return self.unet(self._input(x), t, self._class_labels(x, cond), return_dict=False)[0]  # (B, C_out, H, W)


class UNetCond(_DiffusersUNet):
    """`diffusers.UNet2DConditionModel` as a text-conditional backbone (cross-attention on `cond`).

    Args:
        gradient_checkpointing: Recompute block activations in the backward pass to save memory.
        channels_last: Keep weights and activations in NHWC memory order (see `UNet`).
        **unet_kwargs: Any `UNet2DConditionModel` constructor argument, by its diffusers name.
    """

    diffusers_cls = UNet2DConditionModel
    condition = "text"  # cond: (B, L, D) text features for the cross-attention

    def text_shape(self, text_len: int) -> tuple[int, int]:
        """(text_len, D): any length; D is `encoder_hid_dim` when set, else `cross_attention_dim`."""
        config = self.unet.config
        dim = config.encoder_hid_dim if config.get("encoder_hid_dim") is not None else config.cross_attention_dim
        return text_len, int(dim)

    def dummy_cond(
        self, batch_size: int, device: torch.device | str, dtype: torch.dtype, text_len: int
    ) -> torch.Tensor | None:
        return Backbone.dummy_cond(self, batch_size, device, dtype, text_len)  # text features, not class ids

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | float,
        cond: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the diffusion target for a noisy input and text features.

        Args:
            x: (B, C, H, W) noisy input.
            timesteps: (B,) or a scalar, in the schedule's units; integers or fractions.
            cond: (B, L, D) text features, D = cross_attention_dim (encoder_hid_dim when set). Required:
                the null-prompt features for guidance come from the data/diffusion layer.
            class_labels: (B,) long class ids for a model with num_class_embeds; None is the null class.

        Returns:
            (B, out_channels, H, W) prediction.
        """
        config = self.unet.config
        dim = config.encoder_hid_dim if config.encoder_hid_dim is not None else config.cross_attention_dim
        if cond is None:
            raise ValueError(
                f"UNetCond needs text features cond (B, L, {dim}), got None; "
                "for guidance pass the null prompt's features"
            )
        if cond.ndim != 3 or (isinstance(dim, int) and cond.shape[-1] != dim):
            raise ValueError(
                f"cond must be text features (B, L, {dim}), got {tuple(cond.shape)}; "
                "set model.cross_attention_dim to the text encoder's width"
            )
        t = self._timesteps(x, timesteps)  # (B,)
        labels = self._class_labels(x, class_labels)  # (B,) or None
        return self.unet(self._input(x), t, cond, class_labels=labels, return_dict=False)[0]  # (B, C_out, H, W)
