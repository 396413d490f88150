"""The U-ViT's constructor arguments: their allowed values and the checks between them, without torch.

`UViT.__init__` runs `check_uvit_args` first; `train.py` runs it on the composed config before Hydra starts and
before torch loads (`latentdiff.precheck`), so `model.patch_size=3` is answered at once. One check, one place.
"""

from __future__ import annotations

from typing import Any

SKIP_MODES = ("concat_linear", "add", "linear_skip_add", "linear_after_add", "none")
CONV_MODES = ("after", "before", "none")
TIME_CONDS = ("token", "adaln")
PATCH_EMBED_TYPES = ("linear", "conv")
POS_EMBED_TYPES = ("learned", "sincos")


def _choice(arg: str, value: object, allowed: tuple[str, ...], aliases: dict | None = None) -> str:
    """Map a config value (a bool alias or one of `allowed`) to its string, or raise a one-line error."""
    if isinstance(value, bool) and aliases is not None:
        return aliases[value]
    if isinstance(value, str) and value in allowed:
        return value
    names = ([str(k) for k in aliases] if aliases else []) + [repr(a) for a in allowed]
    raise ValueError(f"model.{arg}={value!r} is not allowed; use one of {', '.join(names)}")


def check_uvit_args(
    img_size: int = 224,
    patch_size: int = 16,
    embed_dim: int = 768,
    num_heads: int = 12,
    num_classes: int = -1,
    conv: bool | str = True,
    skip: bool | str = True,
    clip_dim: int | None = None,
    time_cond: str = "token",
    patch_embed_type: str = "linear",
    pos_embed_type: str = "learned",
    **_: Any,
) -> dict[str, str]:
    """Check the U-ViT's arguments (the others are plain sizes the config rules check).

    Returns:
        the switches as their canonical strings: skip, conv, time_cond, patch_embed_type, pos_embed_type.

    Raises:
        ValueError: one line naming the key, the value and what is allowed.
    """
    modes = {
        "skip": _choice("skip", skip, SKIP_MODES, {True: "concat_linear", False: "none"}),
        "conv": _choice("conv", conv, CONV_MODES, {True: "after", False: "none"}),
        "time_cond": _choice("time_cond", time_cond, TIME_CONDS),
        "patch_embed_type": _choice("patch_embed_type", patch_embed_type, PATCH_EMBED_TYPES),
        "pos_embed_type": _choice("pos_embed_type", pos_embed_type, POS_EMBED_TYPES),
    }
    if img_size % patch_size:
        divisors = ", ".join(str(d) for d in range(1, img_size + 1) if img_size % d == 0)
        raise ValueError(
            f"model.patch_size={patch_size} does not divide the input size {img_size}; use one of {divisors}"
        )
    if modes["patch_embed_type"] == "conv" and patch_size & (patch_size - 1):
        raise ValueError(f"model.patch_size={patch_size} must be a power of 2 with model.patch_embed_type='conv'")
    if embed_dim % num_heads:
        raise ValueError(f"model.embed_dim={embed_dim} is not a multiple of model.num_heads={num_heads}")
    if modes["pos_embed_type"] == "sincos" and embed_dim % 4:
        raise ValueError(f"model.embed_dim={embed_dim} must be a multiple of 4 with model.pos_embed_type='sincos'")
    if clip_dim is not None and num_classes > 0:
        raise ValueError(f"model.clip_dim={clip_dim} (text conditioning) needs model.num_classes=-1, got {num_classes}")
    return modes
