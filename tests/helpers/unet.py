"""Tiny diffusers UNet configs (as conf/model/unet_tiny.yaml and unet_cond_tiny.yaml)."""

from __future__ import annotations

TINY = dict(  # as conf/model/unet_tiny.yaml, class-conditional: 4 classes + the null class
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=16,
    norm_num_groups=8,
    num_class_embeds=5,
)
TINY_COND = dict(  # as conf/model/unet_cond_tiny.yaml
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=2,
)

TINY3 = {  # three levels: sizes must be multiples of 4
    **TINY,
    "block_out_channels": (32, 32, 64),
    "down_block_types": ("DownBlock2D",) * 3,
    "up_block_types": ("UpBlock2D",) * 3,
}
