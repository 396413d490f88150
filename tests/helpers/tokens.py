"""A tiny UVit2D config (aMUSEd's layout at toy width) over the tiny VQ's token grid."""

from __future__ import annotations

from ..artefacts import TINY_VQ_CODES, TOKENS

TINY_UVIT2D = dict(
    hidden_size=32, cond_embed_dim=16, micro_cond_encode_dim=4, micro_cond_embed_dim=20, encoder_hidden_size=16,
    vocab_size=TINY_VQ_CODES + 1, codebook_size=TINY_VQ_CODES, in_channels=16, block_out_channels=16,
    num_res_blocks=1, block_num_heads=2, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
    sample_size=TOKENS,
)  # fmt: skip
