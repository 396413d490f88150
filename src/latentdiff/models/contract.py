"""The backbone contract: everything the rest of latentdiff may ask of a denoiser network.

A backbone is a plain `nn.Module` (no Lightning, Hydra, autoencoder or schedule inside) that subclasses
`Backbone` and says, as attributes, what it reads and how it is exported:

- `forward(x, timesteps, cond=None)`: `x` is a noisy latent `(B, C, h, w)` float when `input_kind == "latents"`,
  or token ids `(B, h, w)` int64 when `input_kind == "tokens"`; `timesteps` `(B,)` or a scalar in the
  objective's units; the result is shaped like `x` (latents) or `(B, codebook, h, w)` logits (tokens).
- `guidance_channels`: how many prediction channels classifier-free guidance moves (None: all).
- `learns_variance`: the result has 2C channels, the prediction then Improved DDPM's variance values
  (`objectives.variance`; DiT's `learn_sigma`).
- `condition`: what `cond` is: "class" (class ids `(B,)`, `class_rows` rows in the table: the classes and the
  null class of classifier-free guidance, the last row), "text" (features `(B, L, D)`) or "none".
- `dummy_cond(...)`: a zero condition of the right kind and shape (FLOP counting, shape checks).
- `check_text_features(meta, key)`: refuse a latent store whose text features this backbone reads differently.
- Export: `export_folder` is the folder name a diffusers pipeline uses for it ("unet" or "transformer");
  `save_diffusers(folder, model_cfg)` writes that folder, `load_diffusers(folder)` reads one back (also a
  diffusers folder of the wrapped model, e.g. aMUSEd's `transformer/`) as a state dict keyed for this backbone.

Callers use these and nothing else: no `hasattr`/`getattr` probing of a backbone outside this file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

WEIGHTS = "diffusion_pytorch_model.safetensors"  # the weights file of a diffusers model folder
BACKBONE_CLASS = "LatentdiffBackbone"  # `latentdiff.pipeline`'s diffusers model of a backbone diffusers lacks
BACKBONE_MODULE = "latentdiff_backbone"  # the file in its export folder through which diffusers imports it
# (`pipeline.ship_pipeline_code` writes it)
WRAPPED = "backbone"  # the attribute of `LatentdiffBackbone` that holds the backbone (its weights' prefix)


class Backbone(nn.Module):
    """Base of every backbone (see the module docstring); the defaults describe a latent, unconditional model
    that is exported as a `transformer/` folder of its own config and weights."""

    input_kind: ClassVar[str] = "latents"  # "latents": float (B, C, h, w); "tokens": int64 ids (B, h, w)
    export_folder: ClassVar[str] = "transformer"
    condition: str = "none"  # "class" | "text" | "none"
    guidance_channels: int | None = None  # classifier-free guidance moves the first this many prediction channels
    # (None: all of them; `samplers.cfg`)
    learns_variance: bool = False  # forward returns 2C channels: the prediction, then the variance values v
    # (Improved DDPM's interpolation between the two variance bounds, `objectives.variance`)
    class_rows: int = 0  # rows of the class table (classes + the null class); 0 without one

    def text_shape(self, text_len: int) -> tuple[int, int]:
        """(L, D) of the text features a text-conditional backbone reads (`text_len`: L where the data decides)."""
        raise NotImplementedError(f"{type(self).__name__} takes no text features")

    def dummy_cond(
        self, batch_size: int, device: torch.device | str, dtype: torch.dtype, text_len: int
    ) -> torch.Tensor | None:
        """A zero condition of the kind `forward` takes: (B,) class ids, (B, L, D) text features, or None."""
        if self.condition == "class":
            return torch.zeros(batch_size, dtype=torch.long, device=device)
        if self.condition == "text":
            return torch.zeros(batch_size, *self.text_shape(text_len), device=device, dtype=dtype)
        return None

    def check_text_features(self, meta: dict[str, Any], key: str) -> None:
        """Raise one line when a store's text features (its `text` record) do not fit this backbone."""

    def save_diffusers(self, folder: Path, model_cfg: dict[str, Any]) -> tuple[str, str]:
        """Write this backbone's folder of an export. The default: a `pipeline.LatentdiffBackbone` folder (what its
        `save_pretrained` writes: `config.json` holding the model config, the weights under `backbone.`).

        Returns:
            the (library, class) entry of `model_index.json`.
        """
        import diffusers
        from safetensors.torch import save_file

        folder.mkdir()
        state = {f"{WRAPPED}.{k}": v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
        model = {k: v for k, v in model_cfg.items() if k != "pretrained"}
        record = {"_class_name": BACKBONE_CLASS, "_diffusers_version": diffusers.__version__, "model": model}
        (folder / "config.json").write_text(json.dumps(record, indent=2))
        return BACKBONE_MODULE, BACKBONE_CLASS

    def load_diffusers(
        self, folder: Path, key: str = "model.pretrained", value: str | None = None
    ) -> dict[str, torch.Tensor]:
        """The state dict in a folder `save_diffusers` wrote, keyed for this backbone (`key=value`: what named it,
        for the message)."""
        from latentdiff.models.weights import read_state_dict

        state = read_state_dict(folder / WEIGHTS, key)
        prefix = f"{WRAPPED}."
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
        return state

    def from_official(self, state: dict[str, torch.Tensor], key: str, value: str) -> dict[str, torch.Tensor]:
        """A weights file's state dict, less what the official code stores that this backbone computes (checked
        equal first; `key=value` names the file in the message). The default: the state dict as it is."""
        return state

    def wrap_exported(self, module: nn.Module) -> None:
        """Make `module`, the diffusers model that `save_diffusers` wrote and diffusers loaded, this backbone's
        network (its weights shared; the pipeline of an export builds this wrapper on the meta device)."""
        raise TypeError(f"{type(self).__name__} is exported as a {BACKBONE_CLASS}; it wraps no diffusers model")


def guided_channels(model: Any, channels: int) -> int:
    """The prediction channels classifier-free guidance moves for `model` (a `Backbone`, or a plain callable in
    tests): its `guidance_channels`, else all `channels`."""
    wanted = getattr(model, "guidance_channels", None)
    return channels if wanted is None else min(int(wanted), channels)


def learns_variance(model: Any) -> bool:
    """Whether `model` (a `Backbone`, or a plain callable in tests) returns a learned variance after its prediction."""
    return bool(getattr(model, "learns_variance", False))
