"""U-ViT: a ViT backbone for diffusion models (Bao et al. 2022, "All are Worth Words", CVPR 2023).

Everything is a token: the noisy image patches, the time and the condition (a class label or CLIP text
tokens). Shallow and deep blocks are joined by long skips (paper eq. 3) and an optional 3x3 conv cleans
the unpatchified output. The defaults reproduce the official `libs/uvit.py` and `libs/uvit_t2i.py`
(github.com/baofff/U-ViT): the parameter names are the official ones, so official state dicts load with
`strict=True` and give the official outputs. The other option values are the paper's ablations (Sec. 3).

Token order is the official one: `[label, time, patches]` with class labels, `[time, text, patches]` with
text, `[time, patches]` otherwise (with `time_cond="adaln"` the time token is dropped).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from latentdiff.models.contract import Backbone
from latentdiff.models.uvit_args import check_uvit_args


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding `[cos(t w_k), sin(t w_k)]`, `w_k = max_period^(-k / (dim // 2))` (as ADM).

    Args:
        t: (B,) timesteps, may be fractional.
        dim: embedding width; an odd width gets one zero column.
    Returns:
        (B, dim) float32 embedding.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    return F.pad(emb, (0, dim % 2))  # (B, dim)


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding of a `grid x grid` token grid in row-major order (MAE).

    Returns:
        (grid * grid, dim) float32; the first half of the channels encodes the row, the second the column.
    """
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim / 4,)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (grid, grid) each
    enc = [
        torch.cat([torch.sin(p.reshape(-1, 1) * omega), torch.cos(p.reshape(-1, 1) * omega)], 1) for p in (rows, cols)
    ]  # 2 x (grid^2, dim / 2)
    return torch.cat(enc, dim=1).float()


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, qk_scale: float | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, D // self.num_heads)  # (B, L, 3, H, D / H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, D / H)
        x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, H, L, D / H)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))  # (B, L, D)


class Mlp(nn.Module):
    """Two-layer GELU MLP (timm's `Mlp` names: `fc1`, `fc2`)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (B, L, D)


class Block(nn.Module):
    """Pre-norm transformer block; out-blocks first merge the long skip `h_s` into `h_m` (paper eq. 3)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: float | None,
        skip: str = "none",
        adaln: bool = False,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.skip = skip
        in_features = {"concat_linear": 2 * dim, "linear_skip_add": dim, "linear_after_add": dim}.get(skip)
        self.skip_linear = nn.Linear(in_features, dim) if in_features else None
        # AdaLN: h <- y_s(t) LN(h) + y_b(t) before attention and MLP; y_s = 1 + linear so it starts as LN.
        self.ada_ln = nn.Linear(dim, 4 * dim) if adaln else None

    def merge_skip(self, h_m: torch.Tensor, h_s: torch.Tensor) -> torch.Tensor:
        if self.skip == "concat_linear":
            return self.skip_linear(torch.cat([h_m, h_s], dim=-1))  # official: Linear([h_m, h_s])
        if self.skip == "add":
            return h_m + h_s
        if self.skip == "linear_skip_add":
            return h_m + self.skip_linear(h_s)
        if self.skip == "linear_after_add":
            return self.skip_linear(h_m + h_s)
        return h_m

    def forward(
        self, x: torch.Tensor, skip: torch.Tensor | None = None, emb: torch.Tensor | None = None
    ) -> torch.Tensor:
        if skip is not None:
            x = self.merge_skip(x, skip)  # (B, L, D)
        if self.ada_ln is None:
            x = x + self.attn(self.norm1(x))  # (B, L, D)
            return x + self.mlp(self.norm2(x))  # (B, L, D)
        s1, b1, s2, b2 = self.ada_ln(emb)[:, None].chunk(4, dim=-1)  # 4 x (B, 1, D)
        x = x + self.attn(self.norm1(x) * (1 + s1) + b1)  # (B, L, D)
        return x + self.mlp(self.norm2(x) * (1 + s2) + b2)  # (B, L, D)


class PatchEmbed(nn.Module):
    """Image to patch tokens: one strided conv ("linear", official), or an early-conv stem ("conv").

    The stem (Xiao et al. 2021) is log2(P) stride-2 3x3 convs with ReLU (one stride-1 conv for P = 1),
    widening to `embed_dim`, then a 1x1 conv `proj`.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, kind: str = "linear"):
        super().__init__()
        if kind == "linear":
            self.stem = nn.Identity()
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
            return
        n = max(int(math.log2(patch_size)), 1)
        widths = [in_chans] + [max(embed_dim // 2 ** (n - 1 - i), 1) for i in range(n)]
        layers: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise(widths):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=1 if patch_size == 1 else 2, padding=1), nn.ReLU()]
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(embed_dim, embed_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.stem(x)).flatten(2).transpose(1, 2)  # (B, H W / P^2, D)


class UViT(Backbone):
    """U-ViT noise-prediction backbone.

    Args (the official names and defaults, then the ablation switches):
        img_size: side of the square input (latent or pixel grid), in pixels.
        patch_size: side of a patch; must divide `img_size`.
        in_chans: input (and output) channels.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias, qk_scale: transformer width, number of blocks
            (depth // 2 in-blocks, one mid block, depth // 2 out-blocks), heads, MLP width ratio, qkv bias,
            attention scale (None: head_dim ** -0.5).
        mlp_time_embed: pass the sinusoidal time embedding through a SiLU MLP (D -> 4D -> D).
        num_classes: > 0: class-conditional with that many embedding rows (the null class used for
            classifier-free guidance is the last row, num_classes - 1, as the official 1001); else not.
        use_checkpoint: gradient checkpointing of every block while training.
        conv: True/"after": a 3x3 conv on the unpatchified output (official `final_layer`);
            "before": a 3x3 conv on the token grid before the linear head; False/"none": no conv.
        skip: long skips; True/"concat_linear" (official), "add", "linear_skip_add", "linear_after_add",
            False/"none".
        clip_dim, num_clip_token: width and length of text features; `clip_dim=None` means no text.
        timestep_offset: added to the timesteps before the embedding. The official latent models
            (ImageNet-256/512, MS-COCO) were trained with n in {1..1000}, where diffusers uses t = n - 1:
            set 1 to sample official weights with a diffusers schedule. (Official pixel models took
            999 t for t in (0, 1]: keep 0.)
        time_cond: "token" (official) or "adaln" (no time token; scale and shift of every LayerNorm).
        patch_embed_type: "linear" (official strided conv) or "conv" (early-conv stem).
        pos_embed_type: "learned" (official) or "sincos" (fixed 2D sin-cos; zeros on the extra tokens).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        mlp_time_embed: bool = False,
        num_classes: int = -1,
        use_checkpoint: bool = False,
        conv: bool | str = True,
        skip: bool | str = True,
        clip_dim: int | None = None,
        num_clip_token: int = 77,
        timestep_offset: float = 0.0,
        time_cond: str = "token",
        patch_embed_type: str = "linear",
        pos_embed_type: str = "learned",
    ):
        super().__init__()
        modes = check_uvit_args(
            img_size, patch_size, embed_dim, num_heads, num_classes, conv, skip, clip_dim, time_cond,
            patch_embed_type, pos_embed_type,
        )  # fmt: skip
        skip, self.conv, time_cond = modes["skip"], modes["conv"], modes["time_cond"]
        patch_embed_type, pos_embed_type = modes["patch_embed_type"], modes["pos_embed_type"]
        self.embed_dim, self.in_chans, self.patch_size = embed_dim, in_chans, patch_size
        self.num_classes, self.clip_dim, self.num_clip_token = num_classes, clip_dim, num_clip_token
        # what `cond` is (the backbone contract): class ids, text features or nothing; and the class rows
        self.condition = "text" if clip_dim is not None else "class" if num_classes > 0 else "none"
        self.class_rows = max(int(num_classes), 0)
        self.use_checkpoint, self.timestep_offset = use_checkpoint, float(timestep_offset)
        self.adaln = time_cond == "adaln"

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_embed_type)
        grid = img_size // patch_size
        self.time_embed = (
            nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, embed_dim))
            if mlp_time_embed
            else nn.Identity()
        )
        self.extras = 0 if self.adaln else 1  # the time token
        if num_classes > 0:
            self.label_emb = nn.Embedding(num_classes, embed_dim)
            self.extras += 1
        if clip_dim is not None:
            self.context_embed = nn.Linear(clip_dim, embed_dim)
            self.extras += num_clip_token
        if pos_embed_type == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + grid**2, embed_dim))
        else:
            fixed = F.pad(sincos_pos_embed_2d(embed_dim, grid), (0, 0, self.extras, 0))  # (E + L, D)
            self.register_buffer("pos_embed", fixed[None], persistent=False)

        block = dict(
            dim=embed_dim,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            adaln=self.adaln,
        )
        self.in_blocks = nn.ModuleList([Block(**block) for _ in range(depth // 2)])
        self.mid_block = Block(**block)
        self.out_blocks = nn.ModuleList([Block(**block, skip=skip) for _ in range(depth // 2)])
        self.norm = nn.LayerNorm(embed_dim)
        self.token_conv = nn.Conv2d(embed_dim, embed_dim, 3, padding=1) if self.conv == "before" else None
        self.decoder_pred = nn.Linear(embed_dim, patch_size**2 * in_chans)
        after = self.conv == "after"
        self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1) if after else nn.Identity()

        # Official init: linear weights ~ N(0, 0.02) (truncated at +-2), biases 0, LayerNorm 1/0, learned
        # pos_embed ~ N(0, 0.02); convs and the label embedding keep PyTorch's defaults. AdaLN starts at 0.
        if pos_embed_type == "learned":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)
        for blk in [*self.in_blocks, self.mid_block, *self.out_blocks]:
            if blk.ada_ln is not None:
                nn.init.zeros_(blk.ada_ln.weight)
                nn.init.zeros_(blk.ada_ln.bias)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def text_shape(self, text_len: int) -> tuple[int, int]:
        """(num_clip_token, clip_dim): U-ViT's text tokens have a fixed length."""
        return self.num_clip_token, self.clip_dim

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor | float | int, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict the diffusion target for a noisy input.

        Args:
            x: (B, C, H, W) noisy input, H = W = img_size.
            timesteps: (B,) or a scalar; integers or fractions.
            cond: (B,) long class ids (class mode; the null class is num_classes - 1), (B, L, clip_dim)
                text features (text mode), or None (unconditional model).
        Returns:
            (B, C, H, W) prediction.
        """
        B, C, H, W = x.shape
        P = self.patch_size
        h = self.patch_embed(x)  # (B, L, D), L = H W / P^2
        t = torch.as_tensor(timesteps, device=x.device).float().expand(B) + self.timestep_offset  # (B,)
        emb = self.time_embed(timestep_embedding(t, self.embed_dim).to(h.dtype))  # (B, D)
        h = torch.cat([*self._extra_tokens(emb, cond, B), h], dim=1)  # (B, E + L, D)
        h = h + self.pos_embed  # (B, E + L, D)

        skips = []
        for blk in self.in_blocks:
            h = self._run(blk, h, None, emb)  # (B, E + L, D)
            skips.append(h)
        h = self._run(self.mid_block, h, None, emb)  # (B, E + L, D)
        for blk in self.out_blocks:
            h = self._run(blk, h, skips.pop(), emb)  # (B, E + L, D)

        h = self.norm(h)[:, self.extras :]  # (B, L, D): drop the time/condition tokens
        if self.token_conv is not None:
            grid = h.transpose(1, 2).reshape(B, -1, H // P, W // P)  # (B, D, H / P, W / P)
            h = self.token_conv(grid).flatten(2).transpose(1, 2)  # (B, L, D)
        h = self.decoder_pred(h)  # (B, L, P P C), channels last within a patch
        h = h.reshape(B, H // P, W // P, P, P, C)  # (B, H / P, W / P, P, P, C)
        x = h.permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)  # (B, C, H, W): unpatchify
        return self.final_layer(x)  # (B, C, H, W)

    def _extra_tokens(self, emb: torch.Tensor, cond: torch.Tensor | None, B: int) -> list[torch.Tensor]:
        """The tokens before the patches, in the official order; each (B, n, D)."""
        time = [] if self.adaln else [emb[:, None]]
        if self.num_classes > 0:
            if cond is None or cond.shape != (B,) or cond.is_floating_point():
                raise ValueError(
                    f"this UViT has num_classes={self.num_classes}: cond must be (B,) class ids "
                    f"(the null class is {self.num_classes - 1}), got {_describe(cond)}"
                )
            return [self.label_emb(cond)[:, None], *time]  # official: [label, time]
        if self.clip_dim is not None:
            if cond is None or cond.shape != (B, self.num_clip_token, self.clip_dim):
                raise ValueError(
                    f"this UViT takes text: cond must be (B, {self.num_clip_token}, "
                    f"{self.clip_dim}) features, got {_describe(cond)}"
                )
            return [*time, self.context_embed(cond.to(emb.dtype))]  # official: [time, text]
        if cond is not None:
            raise ValueError(
                f"this UViT is unconditional (num_classes=-1, clip_dim=None): cond must be None, got {_describe(cond)}"
            )
        return time

    def _run(self, blk: Block, h: torch.Tensor, skip: torch.Tensor | None, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(blk, h, skip, emb, use_reentrant=False)
        return blk(h, skip, emb)


def _describe(cond: torch.Tensor | None) -> str:
    return "None" if cond is None else f"a {cond.dtype} tensor of shape {tuple(cond.shape)}"
