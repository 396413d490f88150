"""Frozen CLIP text encoder (transformers `CLIPTextModel` + `CLIPTokenizer`) for text-to-image stores.

Features are the last hidden states of the padded 77-token sequence, (B, 77, 768) for CLIP ViT-L/14:
what official U-ViT (and Stable Diffusion 1.x) condition on. aMUSEd (`model=uvit2d`) conditions on the
penultimate hidden states and the pooled, projected embedding of `CLIPTextModelWithProjection`
(`hidden_layer=-2 pooled=true`): the pooled embedding is appended as one more row, (B, 78, 768), so the store,
the caption dropout and the empty-prompt features of CFG treat it like the other rows.
"""

from __future__ import annotations

import torch
from torch import nn

from latentdiff.autoencoder import DTYPES
from latentdiff.utils import artefact_not_loaded


class FrozenCLIPTextEncoder(nn.Module):
    """Args:
    pretrained: hub id (`openai/clip-vit-large-patch14`) or local folder (`save_pretrained`).
    subfolder: folder of the text encoder inside `pretrained` (e.g. "text_encoder" of an SD repo).
    tokenizer: hub id or folder of the tokenizer (default: `pretrained`).
    tokenizer_subfolder: folder of the tokenizer inside `tokenizer` (e.g. "tokenizer").
    max_length: tokens per caption (padded / truncated); 77 for CLIP.
    dtype: compute dtype ("float32", "float16", "bfloat16").
    hidden_layer: which hidden states: -1 the last layer's (after the final layer norm, U-ViT / SD 1.x), -2 the
        penultimate layer's (aMUSEd), any index of `hidden_states`.
    pooled: append the pooled, projected embedding (`CLIPTextModelWithProjection.text_embeds`) as row L; needs
        the projection width to equal the hidden width (true of the CLIP models).
    """

    def __init__(
        self,
        pretrained: str,
        subfolder: str | None = None,
        tokenizer: str | None = None,
        tokenizer_subfolder: str | None = None,
        max_length: int = 77,
        dtype: str = "float32",
        hidden_layer: int = -1,
        pooled: bool = False,
    ):
        super().__init__()
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        if dtype not in DTYPES:
            raise ValueError(f"text_encoder.dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        tokenizer = tokenizer or pretrained
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(tokenizer, subfolder=tokenizer_subfolder or "")
            cls = CLIPTextModelWithProjection if pooled else CLIPTextModel
            model, info = cls.from_pretrained(
                pretrained, subfolder=subfolder or "", dtype=DTYPES[dtype], output_loading_info=True
            )
        except (OSError, ValueError) as err:
            raise artefact_not_loaded("text_encoder.pretrained", pretrained, err) from None
        if pooled and any(k.startswith("text_projection") for k in info.get("missing_keys", [])):
            raise ValueError(
                f"text_encoder.pooled=true but text_encoder.pretrained={pretrained} has no text projection (a "
                "CLIPTextModel); use a CLIPTextModelWithProjection or CLIPModel folder, or text_encoder.pooled=false"
            )
        self.model = model.eval().requires_grad_(False)
        self.max_length = int(max_length)
        if self.max_length > model.config.max_position_embeddings:
            raise ValueError(
                f"text_encoder.max_length={max_length} exceeds the model's "
                f"{model.config.max_position_embeddings} positions"
            )
        self.dim = model.config.hidden_size
        self.dtype = DTYPES[dtype]
        layers = model.config.num_hidden_layers
        if not -(layers + 1) <= int(hidden_layer) <= layers:
            raise ValueError(
                f"text_encoder.hidden_layer={hidden_layer} is outside the model's {layers + 1} hidden states; "
                "use -1 (last) or -2 (penultimate)"
            )
        if pooled and model.config.projection_dim != self.dim:
            raise ValueError(
                f"text_encoder.pooled=true needs the projection width ({model.config.projection_dim}) to equal the "
                f"hidden width ({self.dim}); use pooled=false"
            )
        self.hidden_layer, self.pooled = int(hidden_layer), bool(pooled)
        self.rows = self.max_length + int(self.pooled)  # feature rows per caption

    def train(self, mode: bool = True) -> FrozenCLIPTextEncoder:
        return super().train(False)

    @torch.no_grad()
    def forward(self, captions: list[str]) -> torch.Tensor:
        """Captions -> (B, rows, D) float32: the hidden states of `hidden_layer` (and the pooled embedding)."""
        tokens = self.tokenizer(
            captions, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        device = next(self.model.parameters()).device
        out = self.model(input_ids=tokens.input_ids.to(device), output_hidden_states=self.hidden_layer != -1)
        # hidden_states[-1] is before the final layer norm; last_hidden_state (after it) is what -1 means here
        states = out.last_hidden_state if self.hidden_layer == -1 else out.hidden_states[self.hidden_layer]
        if self.pooled:
            states = torch.cat([states, out.text_embeds[:, None]], dim=1)  # (B, L + 1, D)
        return states.float()

    def fingerprint(self) -> dict:
        """Identity of the encoder for the store's metadata."""
        facts = {"name": self.model.config.name_or_path, "dim": self.dim, "max_length": self.max_length}
        if self.hidden_layer != -1 or self.pooled:  # older stores have neither key: they are -1 and unpooled
            facts.update(hidden_layer=self.hidden_layer, pooled=self.pooled)
        return facts
