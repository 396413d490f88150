"""A DiT as diffusers' `DiTTransformer2DModel`: which DiTs it can hold, its config, and the weights' two namings.

diffusers' class holds the official DiT layout only (no LightningDiT option, MLP ratio 4, class-conditional with the
null row, DDPM timesteps). Its weights are the official ones renamed: the patch projection is `pos_embed.proj`, every
block carries a copy of the time and class embedders (`norm1.emb`), the fused qkv is split into `to_q/to_k/to_v`,
and the final adaLN and head are `proj_out_1/2`.

One computation differs, which no weight can absorb: diffusers' time embedding divides the frequency exponent by
127 (`Timesteps(..., downscale_freq_shift=1)`) where DiT divides by 128, so a diffusers DiT's outputs differ from
the official model's for the same weights (diffusers' own conversion of the official checkpoints has the same
difference). `tests/unit/test_dit_diffusers.py` shows that this is the only difference and measures it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def diffusers_problem(model_cfg: dict[str, Any]) -> str | None:
    """Why a DiT with this config cannot be written as a `DiTTransformer2DModel` folder; None when it can."""
    switches = [k for k in ("swiglu", "rmsnorm", "rope", "qk_norm") if model_cfg.get(k)]
    if switches:
        return f"LightningDiT's {', '.join(switches)}"
    if float(model_cfg.get("mlp_ratio", 4.0)) != 4.0:
        return f"mlp_ratio={model_cfg.get('mlp_ratio')} (diffusers' blocks are 4 wide)"
    if int(model_cfg.get("num_classes", 1000)) <= 0 or float(model_cfg.get("class_dropout_prob", 0.1)) <= 0:
        return "no class table with a null row"
    if model_cfg.get("time_convention", "dit") != "dit":
        return "SiT's time (DiTPipeline samples DDPM timesteps)"
    return None


def diffusers_config(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """The `DiTTransformer2DModel` arguments of a DiT config (the official layout; `diffusers_problem` is None)."""
    hidden, heads = int(model_cfg["hidden_size"]), int(model_cfg["num_heads"])
    channels = int(model_cfg["in_channels"])
    return {
        "num_attention_heads": heads,
        "attention_head_dim": hidden // heads,
        "in_channels": channels,
        "out_channels": channels * 2 if model_cfg.get("learn_sigma", True) else channels,
        "num_layers": int(model_cfg["depth"]),
        "sample_size": int(model_cfg["input_size"]),
        "patch_size": int(model_cfg["patch_size"]),
        "num_embeds_ada_norm": int(model_cfg["num_classes"]),
        "norm_eps": 1e-6,  # DiT's LayerNorms (diffusers' default 1e-5 would change the MLP's input)
    }


def _pairs(depth: int) -> list[tuple[str, str]]:
    """(DiT name, diffusers name) of every weight but the split qkv and the per-block embedder copies."""
    pairs = [("x_embedder.proj", "pos_embed.proj")]
    for i in range(depth):
        b, d = f"blocks.{i}", f"transformer_blocks.{i}"
        pairs += [
            (f"{b}.adaLN_modulation.1", f"{d}.norm1.linear"),
            (f"{b}.attn.proj", f"{d}.attn1.to_out.0"),
            (f"{b}.mlp.fc1", f"{d}.ff.net.0.proj"),
            (f"{b}.mlp.fc2", f"{d}.ff.net.2"),
        ]
    return [*pairs, ("final_layer.adaLN_modulation.1", "proj_out_1"), ("final_layer.linear", "proj_out_2")]


_EMBEDDERS = [
    ("t_embedder.mlp.0", "norm1.emb.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "norm1.emb.timestep_embedder.linear_2"),
]


def to_diffusers(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """A DiT state dict named as a `DiTTransformer2DModel`'s."""
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _pairs(depth):
        for kind in ("weight", "bias"):
            out[f"{theirs}.{kind}"] = state[f"{ours}.{kind}"]
    for i in range(depth):
        d = f"transformer_blocks.{i}"
        for kind in ("weight", "bias"):
            for ours, theirs in _EMBEDDERS:
                out[f"{d}.{theirs}.{kind}"] = state[f"{ours}.{kind}"]
            for name, part in zip(("to_q", "to_k", "to_v"), state[f"blocks.{i}.attn.qkv.{kind}"].chunk(3), strict=True):
                out[f"{d}.attn1.{name}.{kind}"] = part
        out[f"{d}.norm1.emb.class_embedder.embedding_table.weight"] = state["y_embedder.embedding_table.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def from_diffusers(state: dict[str, torch.Tensor], depth: int, pos_embed: torch.Tensor) -> dict[str, torch.Tensor]:
    """A `DiTTransformer2DModel` state dict named as a DiT's (the embedders of block 0; `pos_embed`: the fixed
    positions, which diffusers does not store)."""
    out: dict[str, torch.Tensor] = {"pos_embed": pos_embed}
    for ours, theirs in _pairs(depth):
        for kind in ("weight", "bias"):
            out[f"{ours}.{kind}"] = state[f"{theirs}.{kind}"]
    first = "transformer_blocks.0"
    for kind in ("weight", "bias"):
        for ours, theirs in _EMBEDDERS:
            out[f"{ours}.{kind}"] = state[f"{first}.{theirs}.{kind}"]
        for i in range(depth):
            parts = [state[f"transformer_blocks.{i}.attn1.{n}.{kind}"] for n in ("to_q", "to_k", "to_v")]
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts)
    out["y_embedder.embedding_table.weight"] = state[f"{first}.norm1.emb.class_embedder.embedding_table.weight"]
    return out


def save_transformer(state: dict[str, torch.Tensor], model_cfg: dict[str, Any], folder: Path) -> None:
    """Write a DiT's weights (`state`, of a DiT with config `model_cfg`; `diffusers_problem` is None) as a diffusers
    `DiTTransformer2DModel` folder."""
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(**diffusers_config(model_cfg))
    model.load_state_dict(to_diffusers(state, int(model_cfg["depth"])), strict=True)
    model.save_pretrained(folder, safe_serialization=True)
