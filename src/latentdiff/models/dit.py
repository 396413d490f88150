"""DiT: the diffusion transformer of Peebles & Xie ("Scalable Diffusion Models with Transformers", ICCV 2023).

The noisy latent is cut into p x p patches (a strided conv, `x_embedder`), given fixed 2D sin-cos positions, and run
through `depth` transformer blocks conditioned by adaLN-Zero: the sum `c` of the time embedding and the class
embedding regresses, per block, a shift, a scale and a gate for attention and for the MLP, all zero at
initialisation so every block starts as the identity. A last adaLN layer and a linear head give p x p x C' values
per token, unpatchified to the image. C' = 2C with `learn_sigma` (the first C channels are the noise prediction,
the last C the interpolation between the two variance bounds of Improved DDPM).

The parameter names and the initialisation are the official ones (github.com/facebookresearch/DiT, `models.py`),
so the official state dicts (`DiT-XL-2-256x256.pt`, `SiT-XL-2-256x256.pt`) load with `strict=True` and give the
official outputs. SiT (Ma et al. 2024) is the same network trained on the flow path; `time_convention="sit"` feeds
it SiT's time and returns this project's velocity (see `DiT.forward`).

LightningDiT's block options (Yao et al. 2025; github.com/hustvl/LightningDiT `models/lightningdit.py`), each off
by default (= DiT): `swiglu` (SwiGLU MLP), `rmsnorm` (RMSNorm with a learned scale in place of the LayerNorms),
`rope` (EVA's 2D rotary positions on queries and keys), `qk_norm` (a norm of the queries and keys per head).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from latentdiff.models.contract import WEIGHTS, Backbone
from latentdiff.models.dit_args import check_dit_args
from latentdiff.models.dit_diffusers import from_diffusers
from latentdiff.models.uvit import timestep_embedding

FREQUENCY_DIM = 256  # the sinusoidal time embedding's width before the MLP (official)


def dit_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """DiT's fixed 2D sin-cos position embedding (MAE's `get_2d_sincos_pos_embed`), row-major tokens.

    The first half of the channels encodes the column, the second half the row (MAE builds its grid with
    `np.meshgrid(grid_w, grid_h)`); each half is `[sin(p w_k), cos(p w_k)]`, `w_k = 10000^(-k / (dim / 4))`.

    Returns:
        (grid * grid, dim) float32.
    """
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))  # (dim / 4,)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (grid, grid) each
    halves = [
        torch.cat([torch.sin(p.reshape(-1, 1) * omega), torch.cos(p.reshape(-1, 1) * omega)], 1) for p in (cols, rows)
    ]  # 2 x (grid^2, dim / 2)
    return torch.cat(halves, dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: `x (1 + scale) + shift`, with (B, D) shift and scale broadcast over the tokens of (B, L, D) x."""
    return x * (1 + scale[:, None]) + shift[:, None]


def _norm(dim: int, rmsnorm: bool) -> nn.Module:
    """A block's norm: DiT's LayerNorm (no affine, eps 1e-6), or LightningDiT's RMSNorm (a learned scale, eps 1e-6)."""
    if rmsnorm:
        return nn.RMSNorm(dim, eps=1e-6)
    return nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)


def _qk_norm(head_dim: int, rmsnorm: bool) -> nn.Module:
    """LightningDiT's query/key norm per head: RMSNorm with `rmsnorm`, else timm's LayerNorm (affine, eps 1e-5)."""
    return nn.RMSNorm(head_dim, eps=1e-6) if rmsnorm else nn.LayerNorm(head_dim)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps to (B, D): the 256-wide sinusoidal embedding (`[cos, sin]`, as ADM), then a SiLU MLP."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_DIM, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, FREQUENCY_DIM).to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class ids to (B, D); the last row (id `num_classes`) is the null class of classifier-free guidance.

    The labels are dropped to the null class by the Lightning module (`module.p_uncond`), not here: the table
    has the null row whenever `class_dropout_prob > 0`, as the official one does.
    """

    def __init__(self, num_classes: int, hidden_size: int, class_dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(class_dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)  # (B, D)


class RotaryEmbedding2D(nn.Module):
    """2D rotary positions (RoPE, Su et al.; 2D as EVA-02 and LightningDiT): the first half of each head's
    channels rotates by the token's row, the second half by its column, in interleaved pairs
    `(x_2i, x_2i+1)`, at frequencies `theta^(-2k / (head_dim / 2))`."""

    def __init__(self, head_dim: int, grid: int, theta: float = 10000.0):
        super().__init__()
        quarter = head_dim // 4
        freqs = 1.0 / theta ** (torch.arange(quarter, dtype=torch.float64) * 2 / (head_dim // 2))  # (hd / 4,)
        coords = torch.arange(grid, dtype=torch.float64)
        rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (grid, grid) each
        angles = torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=1)  # (L, hd / 2)
        angles = angles.repeat_interleave(2, dim=1)  # (L, hd): one angle per pair
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate (B, H, L, hd) queries or keys."""
        x32 = x.float()  # the rotation in float32 (under bf16 autocast too), as LightningDiT's float32 tables
        pairs = x32.unflatten(-1, (-1, 2))  # (B, H, L, hd / 2, 2)
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)  # (B, H, L, hd)
        return (x32 * self.cos + rotated * self.sin).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention (timm's `Attention` names: `qkv`, `proj`, `q_norm`, `k_norm`), qkv with bias."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, rmsnorm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = _qk_norm(head_dim, rmsnorm) if qk_norm else nn.Identity()
        self.k_norm = _qk_norm(head_dim, rmsnorm) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding2D | None = None) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, D // self.num_heads)  # (B, L, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, hd)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))  # (B, L, D)


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU (timm's `Mlp` names: `fc1`, `fc2`)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (B, L, D)


class SwiGLU(nn.Module):
    """SwiGLU MLP (Shazeer 2020) at about the GELU MLP's parameters: a hidden width of 2/3 of it, as LightningDiT
    (its `SwiGLUFFN` names: `w12` the fused gate and value, `w3` the output)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        hidden = int(2 / 3 * hidden)
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)  # 2 x (B, L, hidden)
        return self.w3(F.silu(gate) * value)  # (B, L, D)


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero: `x + gate * f(modulate(norm(x), shift, scale))` for attention and MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, swiglu: bool, rmsnorm: bool, qk_norm: bool):
        super().__init__()
        self.norm1 = _norm(hidden_size, rmsnorm)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm, rmsnorm=rmsnorm)
        self.norm2 = _norm(hidden_size, rmsnorm)
        self.mlp = (SwiGLU if swiglu else Mlp)(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: RotaryEmbedding2D | None = None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)  # (B, L, D)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, L, D)


class FinalLayer(nn.Module):
    """adaLN (shift and scale, no gate) and the linear head to p * p * C' values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, rmsnorm: bool):
        super().__init__()
        self.norm_final = _norm(hidden_size, rmsnorm)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (B, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, L, p p C')


class PatchEmbed(nn.Module):
    """Image to patch tokens by one strided conv (timm's `PatchEmbed` name: `proj`)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, H W / p^2, D)


class DiT(Backbone):
    """The DiT backbone (official constructor names and defaults: DiT-XL/2 on 256-px ImageNet latents).

    Args:
        input_size: side of the square latent; patch_size: side of a patch (2, 4, 8 in the paper), divides it.
        in_channels: latent channels; the output has as many, twice as many with `learn_sigma`.
        hidden_size, depth, num_heads, mlp_ratio: width, blocks, heads and MLP ratio (S/B/L/XL: 384/768/1024/1152
            wide, 12/12/24/28 deep, 6/12/16/16 heads).
        class_dropout_prob: > 0 adds the null row (id `num_classes`) to the class table; the labels themselves
            are dropped by the Lightning module (`module.p_uncond`).
        num_classes: classes (0: unconditional, no class table; not an official option).
        learn_sigma: predict Improved DDPM's variance interpolation too (2C output channels).
        swiglu, rmsnorm, rope, qk_norm: LightningDiT's block options (module docstring); False is DiT.
        time_convention: "dit": the timesteps go to the embedding as given (DDPM indices 0..999). "sit": the
            timesteps are this project's flow time in [0, 1000] (1000: noise); the network sees SiT's time
            1 - t / 1000 (1: data) and its velocity (data - noise) is returned negated, this project's
            (noise - data), so official SiT weights sample with `diffusion=flow`. As SiT, it returns the
            velocity only (C channels), with or without `learn_sigma`.
        guidance_channels: classifier-free guidance moves the first this many channels of the prediction (None:
            all); 3 reproduces the official sampling scripts of DiT, SiT and LightningDiT (`forward_with_cfg`).
        use_checkpoint: gradient checkpointing of every block while training.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        swiglu: bool = False,
        rmsnorm: bool = False,
        rope: bool = False,
        qk_norm: bool = False,
        time_convention: str = "dit",
        guidance_channels: int | None = None,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        check_dit_args(
            input_size, patch_size, hidden_size, num_heads, num_classes, class_dropout_prob, rope, time_convention,
            guidance_channels, in_channels,
        )  # fmt: skip
        self.guidance_channels = guidance_channels
        self.in_channels, self.patch_size, self.learn_sigma = in_channels, patch_size, bool(learn_sigma)
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learns_variance = self.learn_sigma and time_convention != "sit"  # the backbone contract's name
        self.num_classes, self.sit_time = num_classes, time_convention == "sit"
        self.condition = "class" if num_classes > 0 else "none"
        self.class_rows = num_classes + int(class_dropout_prob > 0) if num_classes > 0 else 0
        self.use_checkpoint = use_checkpoint

        grid = input_size // patch_size
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        # fixed, as the official `requires_grad=False` parameter: kept in the state dict, never trained
        self.register_buffer("pos_embed", dit_pos_embed_2d(hidden_size, grid)[None])
        self.rope = RotaryEmbedding2D(hidden_size // num_heads, grid) if rope else None
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, swiglu, rmsnorm, qk_norm) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, rmsnorm)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official initialisation: Xavier-uniform linear layers (and patch projection, as a matrix), zero
        biases, N(0, 0.02) class table and time MLP, and adaLN-Zero: every modulation and the head at zero."""

        def basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(basic)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [*(b.adaLN_modulation[-1] for b in self.blocks), self.final_layer.adaLN_modulation[-1]]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor | float | int, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict the target (and, with `learn_sigma`, the variance interpolation) for a noisy latent.

        Args:
            x: (B, C, H, W) noisy latent, H = W = input_size.
            timesteps: (B,) or a scalar, in the objective's units (see `time_convention`).
            cond: (B,) long class ids (the null class is `num_classes`), or None for an unconditional model.
        Returns:
            (B, C, H, W), or (B, 2C, H, W) with `learn_sigma` (not with SiT's time): the prediction, then the
            variance values.
        """
        B, C, H, W = x.shape
        p = self.patch_size
        t = torch.as_tensor(timesteps, device=x.device).float().expand(B)  # (B,)
        if self.sit_time:
            t = 1 - t / 1000  # this project's flow time (1000: noise) -> SiT's (1: data)
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (B, L, D)
        c = self.t_embedder(t)  # (B, D)
        if self.y_embedder is not None:
            if cond is None or cond.shape != (B,) or cond.is_floating_point():
                got = "None" if cond is None else f"a {cond.dtype} tensor of shape {tuple(cond.shape)}"
                raise ValueError(
                    f"this DiT has num_classes={self.num_classes}: cond must be (B,) class ids "
                    f"(the null class is {self.num_classes}), got {got}"
                )
            c = c + self.y_embedder(cond)  # (B, D)
        elif cond is not None:
            raise ValueError("this DiT is unconditional (num_classes=0): cond must be None")
        for block in self.blocks:
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(block, h, c, self.rope, use_reentrant=False)
            else:
                h = block(h, c, self.rope)  # (B, L, D)
        h = self.final_layer(h, c)  # (B, L, p p C')
        h = h.reshape(B, H // p, W // p, p, p, self.out_channels)  # (B, H / p, W / p, p, p, C')
        out = h.permute(0, 5, 1, 3, 2, 4).reshape(B, self.out_channels, H, W)  # (B, C', H, W): unpatchify
        if self.sit_time:  # SiT's velocity (data - noise) -> this project's (noise - data); SiT returns no
            return -out[:, :C]  # variance channels (its `learn_sigma` channels are never trained)
        return out

    def from_official(self, state: dict[str, torch.Tensor], key: str, value: str) -> dict[str, torch.Tensor]:
        """LightningDiT's checkpoints store the rotary tables (`feat_rope.freqs_cos/sin`, (L, head_dim), laid out as
        `RotaryEmbedding2D`'s): checked equal to this model's, then dropped."""
        tables = {k: v for k, v in state.items() if k.startswith("feat_rope.")}
        if not tables or self.rope is None:
            return state  # a model without RoPE: check_fits names the unexpected tables
        for name, ours in (("freqs_cos", self.rope.cos), ("freqs_sin", self.rope.sin)):
            theirs = tables.get(f"feat_rope.{name}")
            if theirs is None or theirs.shape != ours.shape or not torch.allclose(theirs.float(), ours, atol=1e-4):
                got = "(missing)" if theirs is None else str(tuple(theirs.shape))
                raise ValueError(
                    f"{key}={value}: its rotary table feat_rope.{name} {got} is not this model's "
                    f"{tuple(ours.shape)} (input_size / patch_size and hidden_size / num_heads decide it)"
                )
        return {k: v for k, v in state.items() if k not in tables}

    def load_diffusers(
        self, folder: Path, key: str = "model.pretrained", value: str | None = None
    ) -> dict[str, torch.Tensor]:
        """The state dict of a `DiTTransformer2DModel` folder (`dit_diffusers`; what a `DiTPipeline` export holds) or
        of the contract's own folder, keyed for this DiT."""
        from latentdiff.models.weights import read_state_dict

        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        if config.get("_class_name") != "DiTTransformer2DModel":
            return super().load_diffusers(folder, key, value)
        state = read_state_dict(folder / WEIGHTS, key)
        return from_diffusers(state, len(self.blocks), self.pos_embed.detach().clone())
