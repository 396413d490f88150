"""A KL autoencoder checkpoint in the LDM layout (CompVis latent-diffusion, taming; LightningDiT's VA-VAE) as a
diffusers `AutoencoderKL`: the LDM architecture (`ddconfig`) as diffusers' config, the weights renamed.

LDM's encoder and decoder put self-attention at the resolutions in `attn_resolutions`, also inside the down and up
levels (VA-VAE: at 16 px): diffusers' `AttnDownEncoderBlock2D` / `AttnUpDecoderBlock2D` hold those, so the same
network runs in diffusers' class. Its 1x1-conv attention projections become linear layers; the decoder's levels
are numbered the other way (LDM `up.0` is the last, full-resolution level; diffusers' `up_blocks.0` the first).
The file is read with `weights_only=True`; keys outside the autoencoder (the training loss, the vision model of
VA-VAE's alignment loss) are dropped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from latentdiff.checkpoint import read_weights_file
from latentdiff.models.weights import check_fits

_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_RESNET = {"nin_shortcut": "conv_shortcut"}
_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_END = {"norm_out": "conv_norm_out"}
_NEEDED = ("ch", "ch_mult", "num_res_blocks", "resolution", "z_channels")  # ddconfig keys without a default


def diffusers_config(ddconfig: dict[str, Any]) -> dict[str, Any]:
    """`AutoencoderKL` arguments of an LDM `ddconfig` (ch, ch_mult, num_res_blocks, attn_resolutions, resolution,
    z_channels, in_channels, out_ch).

    Raises:
        ValueError: a key the layout needs is missing, named as `vae.ldm.<key>`.
    """
    missing = [k for k in _NEEDED if k not in ddconfig]
    if missing:
        raise ValueError(
            f"vae.ldm.{missing[0]} is not set: vae.ldm needs {', '.join(_NEEDED)} (the checkpoint's ddconfig)"
        )
    mult, resolution = list(ddconfig["ch_mult"]), int(ddconfig["resolution"])
    attn = {int(r) for r in ddconfig.get("attn_resolutions") or ()}
    levels = len(mult)
    sizes = [resolution // 2**i for i in range(levels)]  # the side of each level, full resolution first
    return {
        "in_channels": int(ddconfig.get("in_channels", 3)),
        "out_channels": int(ddconfig.get("out_ch", 3)),
        "down_block_types": [("AttnDownEncoderBlock2D" if s in attn else "DownEncoderBlock2D") for s in sizes],
        "up_block_types": [("AttnUpDecoderBlock2D" if s in attn else "UpDecoderBlock2D") for s in sizes[::-1]],
        "block_out_channels": [int(ddconfig["ch"]) * m for m in mult],
        "layers_per_block": int(ddconfig["num_res_blocks"]),
        "latent_channels": int(ddconfig["z_channels"]),
        "norm_num_groups": 32,  # LDM's Normalize
        "sample_size": resolution,
    }


def _rename(key: str, levels: int) -> str:
    """The diffusers name of one LDM autoencoder key."""
    m = re.match(r"(encoder|decoder)\.(down|up)\.(\d+)\.(block|attn|downsample|upsample)\.(.+)", key)
    if m:
        side, way, level, kind, rest = m.groups()
        index = int(level) if way == "down" else levels - 1 - int(level)
        folder = f"{side}.{way}_blocks.{index}"
        if kind in ("downsample", "upsample"):
            return f"{folder}.{kind}rs.0.{rest}"
        number, name, param = rest.split(".", 2)
        table = _RESNET if kind == "block" else _ATTENTION
        return f"{folder}.{'resnets' if kind == 'block' else 'attentions'}.{number}.{table.get(name, name)}.{param}"
    m = re.match(r"(encoder|decoder)\.mid\.(block|attn)_(\d)\.([^.]+)\.(.+)", key)
    if m:
        side, kind, number, name, param = m.groups()
        table = _RESNET if kind == "block" else _ATTENTION
        group = "resnets" if kind == "block" else "attentions"
        return f"{side}.mid_block.{group}.{int(number) - 1}.{table.get(name, name)}.{param}"
    m = re.match(r"(encoder|decoder)\.(norm_out)\.(.+)", key)
    return f"{m.group(1)}.{_END[m.group(2)]}.{m.group(3)}" if m else key


def to_diffusers(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """An LDM autoencoder state dict (`levels`: len(ch_mult)) named and shaped as an `AutoencoderKL`'s."""
    out = {}
    for key, value in state.items():
        if not key.startswith(_PARTS):
            continue  # the loss, VA-VAE's foundation model
        name = _rename(key, levels)
        if ".attentions." in name and value.ndim == 4:  # 1x1 convs -> linear layers
            value = value[:, :, 0, 0]
        out[name] = value
    return out


def load_ldm_vae(path: str | Path, ddconfig: dict[str, Any], dtype: torch.dtype, key: str = "vae.pretrained") -> Any:
    """The `AutoencoderKL` of an LDM-layout checkpoint file (.pt/.ckpt/.pth, or .safetensors), in `dtype`.

    Raises:
        FileNotFoundError: no such file (the message says where VA-VAE is downloaded).
        ValueError: the file does not hold this `ddconfig`'s autoencoder (one line naming what differs).
    """
    from diffusers import AutoencoderKL

    download = "the checkpoint (VA-VAE: vavae-imagenet256-f16d32-dinov2.pt of "
    download += "huggingface.co/hustvl/vavae-imagenet256-f16d32-dinov2)"
    state = read_weights_file(path, key, download, what="autoencoder checkpoint")  # weights_only=True
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{key}={path} holds no state dict of tensors")
    vae = AutoencoderKL(**diffusers_config(ddconfig))
    weights = to_diffusers(state, len(ddconfig["ch_mult"]))
    check_fits(vae, weights, key, path, "vae.ldm (set vae.ldm to the checkpoint's ddconfig)")
    vae.load_state_dict(weights)
    return vae if dtype == torch.float32 else vae.to(dtype)
