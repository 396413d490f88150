"""diffusers' `UVit2DModel` (the aMUSEd transformer, Patil et al. 2024) behind the backbone contract.

It is not Bao et al.'s U-ViT (`latentdiff.models.uvit`): it reads VQ-GAN token ids, not noisy latents, and
returns logits over the codebook for each token (masked-token / MaskGIT training,
`latentdiff.objectives.masked_tokens`):

    forward(ids, timesteps, cond) -> logits      ids (B, h, w) int64 in [0, vocab_size), mask id vocab_size - 1
                                                 logits (B, codebook_size, h, w)

`timesteps` is accepted and ignored: like MaskGIT and aMUSEd the model is not told the masking ratio.

Conditioning (UVit2DModel takes cross-attention states (B, L, encoder_hidden_size), a pooled embedding
(B, cond_embed_dim) and micro-conditions (B, k)):
- text (`text_conditioning=true`): cond is the store's text features (B, L, D). With `pooled_text=true` the last
  row is the text encoder's pooled, projected embedding (`text_encoder.pooled=true`, as aMUSEd's
  `CLIPTextModelWithProjection.text_embeds`) and rows 0..L-2 are the hidden states; otherwise the pooled
  embedding is the mean of the hidden states.
- class ids (`num_class_embeds` = classes + 1, the last row the null class of CFG): a learned context token and
  a learned pooled embedding per class, as a class-conditional model needs something to attend to.
- unconditional: one learned context token and pooled embedding.
- micro-conditions (`micro_conds`): aMUSEd's [width, height, crop top, crop left, aesthetic score], constant for
  a run (stores are centre-cropped at one resolution), each sinusoidally encoded to `micro_cond_encode_dim`.

Every `UVit2DModel` constructor argument is taken by its diffusers name; the diffusers model is `self.transformer`
(state-dict keys `transformer.<diffusers key>`), so `model.pretrained=<a UVit2DModel folder>` (e.g. the
`transformer/` folder of `amused/amused-256`) loads official weights into a text-conditional model.
"""

from __future__ import annotations

import inspect
import types
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from diffusers import UVit2DModel
from torch import nn

from latentdiff.models.contract import Backbone
from latentdiff.utils import artefact_not_loaded


def vocab_error(vocab: int, codebook: int) -> str:
    """The one-line error of a vocabulary with no room for the mask id after the codebook's ids."""
    return (
        f"model.vocab_size={vocab} is too small for model.codebook_size={codebook} and the mask token "
        f"(id vocab_size - 1); use model.vocab_size >= {codebook + 1}"
    )


class UVit2D(Backbone):
    """Args:
    num_class_embeds: rows of the class tables (classes + 1 for the null class); <= 0 or None: no classes.
    text_conditioning: cond is text features (B, L, encoder_hidden_size).
    pooled_text: the last row of the text features is the pooled embedding (needs cond_embed_dim ==
        encoder_hidden_size); false: the pooled embedding is the mean of the rows.
    micro_conds: the micro-condition values (length micro_cond_embed_dim / micro_cond_encode_dim).
    gradient_checkpointing: recompute the transformer layers' activations in the backward pass.
    **uvit_kwargs: any `UVit2DModel` constructor argument, by its diffusers name.
    """

    input_kind = "tokens"  # the input is token ids (B, h, w), not a float latent (B, C, h, w)

    def __init__(
        self,
        num_class_embeds: int | None = None,
        text_conditioning: bool = False,
        pooled_text: bool = True,
        micro_conds: list[float] | tuple[float, ...] = (256, 256, 0, 0, 6),
        gradient_checkpointing: bool = False,
        **uvit_kwargs: Any,
    ):
        super().__init__()
        defaults = {k: p.default for k, p in inspect.signature(UVit2DModel.__init__).parameters.items() if k != "self"}
        for key in uvit_kwargs:
            if key not in defaults:
                raise ValueError(f"model.{key} is not an argument of diffusers.UVit2DModel; see conf/model/uvit2d.yaml")
        get = lambda key: uvit_kwargs.get(key, defaults[key])
        if get("codebook_size") is None:
            raise ValueError(
                "model.codebook_size=null: UVit2D reads the token ids of a VQ model; use vae=vq_amused256, vq_local "
                "or vq_tiny with diffusion=masked_tokens sampler=amused (e.g. experiment=quickstart_tokens)"
            )
        codebook, vocab = int(get("codebook_size")), int(get("vocab_size"))
        if vocab < codebook + 1:
            raise ValueError(vocab_error(vocab, codebook))
        encode, embed = int(get("micro_cond_encode_dim")), int(get("micro_cond_embed_dim"))
        micro = [float(v) for v in micro_conds]
        if len(micro) * encode != embed:
            raise ValueError(
                f"model.micro_conds has {len(micro)} values but model.micro_cond_embed_dim={embed} is "
                f"{embed / encode:g} x micro_cond_encode_dim={encode}; give {embed // encode} values"
            )
        for width, heads in (("hidden_size", "num_attention_heads"), ("block_out_channels", "block_num_heads")):
            if int(get(width)) % int(get(heads)):
                raise ValueError(f"model.{heads}={get(heads)} must divide model.{width}={get(width)}")
        size = int(get("sample_size"))
        if get("downsample") and size % 2:
            raise ValueError(f"model.sample_size={size} (the token grid) must be even with model.downsample=true")
        if text_conditioning and num_class_embeds is not None and int(num_class_embeds) > 0:
            raise ValueError("model.text_conditioning=true and model.num_class_embeds > 0: choose one condition")
        hidden, pooled = int(get("encoder_hidden_size")), int(get("cond_embed_dim"))
        if text_conditioning and hidden != pooled:
            raise ValueError(
                f"model.text_conditioning=true needs model.cond_embed_dim={pooled} == model.encoder_hidden_size="
                f"{hidden}: the pooled embedding is a row (or the mean) of the text features; set both to data.text_dim"
            )
        self.transformer = UVit2DModel(**uvit_kwargs)
        if gradient_checkpointing:  # diffusers' own switch calls its checkpoint wrapper with keywords it does not take
            for layer in self.transformer.transformer_layers:
                layer.forward = types.MethodType(_checkpointed_forward, layer)
        self.codebook_size, self.vocab_size, self.mask_token_id = codebook, vocab, vocab - 1
        self.text_conditioning, self.pooled_text = bool(text_conditioning), bool(pooled_text)
        self.num_classes = int(num_class_embeds) - 1 if num_class_embeds is not None and num_class_embeds > 0 else 0
        # what `cond` is (the backbone contract): class ids, text features or nothing; and the class rows
        self.condition = "text" if text_conditioning else "class" if self.num_classes > 0 else "none"
        self.class_rows = self.num_classes + 1 if self.num_classes > 0 else 0
        self.text_dim = hidden
        if not self.text_conditioning:
            rows = self.num_classes + 1 if self.num_classes > 0 else 1  # classes + null, or one unconditional row
            self.class_context = nn.Embedding(rows, hidden)  # the one token the cross-attention reads
            self.class_pooled = nn.Embedding(rows, pooled)
            nn.init.normal_(self.class_context.weight, std=0.02)
            nn.init.normal_(self.class_pooled.weight, std=0.02)
        self.register_buffer("micro_conds", torch.tensor(micro), persistent=False)  # (k,)

    def _conditions(self, ids: torch.Tensor, cond: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoder_hidden_states (B, L, D), pooled (B, P)) from the backbone's `cond`."""
        B = ids.shape[0]
        if self.text_conditioning:
            if cond is None or not cond.is_floating_point() or cond.ndim != 3:
                got = "None" if cond is None else f"{cond.dtype} {list(cond.shape)}"
                raise ValueError(f"UVit2D with text_conditioning needs text features (B, L, D), got {got}")
            if self.pooled_text:
                return cond[:, :-1], cond[:, -1]  # (B, L - 1, D) hidden states, (B, D) pooled
            return cond, cond.mean(dim=1)
        if cond is None:
            rows = torch.full((B,), self.num_classes, dtype=torch.long, device=ids.device)  # null / only row
        elif cond.is_floating_point() or cond.shape != (B,):
            raise ValueError(f"class ids must be integers shaped (B,)=({B},), got {cond.dtype} {list(cond.shape)}")
        elif self.num_classes == 0:
            raise ValueError("got class ids but the model has no class tables (model.num_class_embeds)")
        else:
            rows = cond
        return self.class_context(rows)[:, None], self.class_pooled(rows)  # (B, 1, D), (B, P)

    def forward(
        self, ids: torch.Tensor, timesteps: torch.Tensor | float | None = None, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits over the codebook for each token.

        Args:
            ids: (B, h, w) int64 token ids, the masked ones equal to `mask_token_id` (vocab_size - 1).
            timesteps: ignored (the masking ratio is not an input of aMUSEd / MaskGIT).
            cond: (B,) class ids, (B, L, D) text features, or None (see the module docstring).

        Returns:
            (B, codebook_size, h, w) logits.
        """
        if ids.is_floating_point() or ids.ndim != 3:
            raise ValueError(f"UVit2D takes token ids (B, h, w) int64, got {ids.dtype} {list(ids.shape)}")
        context, pooled = self._conditions(ids, cond)  # (B, L, D), (B, P)
        micro = self.micro_conds.expand(ids.shape[0], -1)  # (B, k)
        return self.transformer(ids, encoder_hidden_states=context, pooled_text_emb=pooled, micro_conds=micro)

    def text_shape(self, text_len: int) -> tuple[int, int]:
        """(text_len, encoder_hidden_size): the store's text features, any length."""
        return text_len, self.text_dim

    def check_text_features(self, meta: dict[str, Any], key: str) -> None:
        """The pooled embedding is read from the last feature row exactly when the store's text encoder wrote one
        there (`text_encoder.pooled=true`).

        Raises:
            ValueError: one line naming `model.pooled_text`, the store (`key`) and what to set.
        """
        if not self.text_conditioning or not meta:
            return
        stored = bool(meta.get("pooled"))
        if self.pooled_text != stored:
            held = "ends with the pooled embedding" if stored else "holds no pooled embedding (hidden states only)"
            raise ValueError(
                f"model.pooled_text={str(self.pooled_text).lower()} but {key}'s text features {held}; set "
                f"model.pooled_text={str(stored).lower()}"
                + ("" if stored else " or extract with text_encoder.pooled=true (aMUSEd: text_encoder=amused)")
            )

    def save_diffusers(self, folder: Path, model_cfg: dict[str, Any]) -> tuple[str, str]:
        """A diffusers `UVit2DModel` folder (as aMUSEd's `transformer/`); the class tables are only in the
        export's backbone.safetensors."""
        self.transformer.save_pretrained(folder, safe_serialization=True)
        return "diffusers", type(self.transformer).__name__

    def load_diffusers(
        self, folder: Path, key: str = "model.pretrained", value: str | None = None
    ) -> dict[str, torch.Tensor]:
        """The state dict of a `UVit2DModel` folder (e.g. aMUSEd's `transformer/`), keyed for this wrapper."""
        try:
            model = UVit2DModel.from_pretrained(folder)
        except (OSError, ValueError) as err:
            raise artefact_not_loaded(key, value or str(folder), err) from None
        return {f"transformer.{k}": v for k, v in model.state_dict().items()}


def _checkpointed_forward(layer: nn.Module, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """A transformer layer's forward that recomputes its activations in the backward pass while gradients are on.

    Bound to the layer with `types.MethodType`, so `copy.deepcopy` (the EMA copy) binds it to the copied layer.
    """
    forward = type(layer).forward.__get__(layer)
    if not torch.is_grad_enabled():
        return forward(hidden_states, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, hidden_states, use_reentrant=False, **kwargs)
