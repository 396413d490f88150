"""Frozen CLIP text encoder (transformers `CLIPTextModel` + `CLIPTokenizer`) for text-to-image stores.

Features are the last hidden states of the padded 77-token sequence, (B, 77, 768) for CLIP ViT-L/14:
what official U-ViT (and Stable Diffusion 1.x) condition on.
"""

from __future__ import annotations

import torch
from torch import nn

from latentdiff.autoencoder import _DTYPES
from latentdiff.utils import artefact_not_loaded


class FrozenCLIPTextEncoder(nn.Module):
    """Args:
    pretrained: hub id (`openai/clip-vit-large-patch14`) or local folder (`save_pretrained`).
    subfolder: folder of the text encoder inside `pretrained` (e.g. "text_encoder" of an SD repo).
    tokenizer: hub id or folder of the tokenizer (default: `pretrained`).
    tokenizer_subfolder: folder of the tokenizer inside `tokenizer` (e.g. "tokenizer").
    max_length: tokens per caption (padded / truncated); 77 for CLIP.
    dtype: compute dtype ("float32", "float16", "bfloat16").
    """

    def __init__(
        self,
        pretrained: str,
        subfolder: str | None = None,
        tokenizer: str | None = None,
        tokenizer_subfolder: str | None = None,
        max_length: int = 77,
        dtype: str = "float32",
    ):
        super().__init__()
        from transformers import CLIPTextModel, CLIPTokenizer

        if dtype not in _DTYPES:
            raise ValueError(f"text_encoder.dtype={dtype!r} is not supported; use one of {', '.join(_DTYPES)}")
        tokenizer = tokenizer or pretrained
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(tokenizer, subfolder=tokenizer_subfolder or "")
            model = CLIPTextModel.from_pretrained(pretrained, subfolder=subfolder or "", dtype=_DTYPES[dtype])
        except (OSError, ValueError) as err:
            raise artefact_not_loaded("text_encoder.pretrained", pretrained, err) from None
        self.model = model.eval().requires_grad_(False)
        self.max_length = int(max_length)
        if self.max_length > model.config.max_position_embeddings:
            raise ValueError(
                f"text_encoder.max_length={max_length} exceeds the model's "
                f"{model.config.max_position_embeddings} positions"
            )
        self.dim = model.config.hidden_size
        self.dtype = _DTYPES[dtype]

    def train(self, mode: bool = True) -> FrozenCLIPTextEncoder:
        return super().train(False)

    @torch.no_grad()
    def forward(self, captions: list[str]) -> torch.Tensor:
        """Captions -> (B, max_length, D) float32 last hidden states."""
        tokens = self.tokenizer(
            captions, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        device = next(self.model.parameters()).device
        out = self.model(input_ids=tokens.input_ids.to(device))
        return out.last_hidden_state.float()

    def fingerprint(self) -> dict:
        """Identity of the encoder for the store's metadata."""
        return {"name": self.model.config.name_or_path, "dim": self.dim, "max_length": self.max_length}
