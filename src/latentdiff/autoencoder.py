"""Frozen autoencoders: the identity (pixel space), the Stable Diffusion VAE (`AutoencoderKL`) and a VQ-GAN
tokenizer (`VQModel`, for masked-token models such as aMUSEd).

The continuous ones offer the same three calls, and the wrapper owns the scaling factor:

    moments = ae.encode_moments(images)   # images in [-1, 1]; KL: (B, 2C, h, w) = mean ++ logvar
    z = ae.sample(moments)                # z = scale * (mean + std * eps) (KL: `latent_norm.model_latents`)
    images = ae.decode(z)                 # back to [-1, 1] pixels

The tokenizer offers the discrete pair:

    ids = vq.encode_tokens(images)        # images in [-1, 1] -> (B, h, w) int64 codebook ids
    images = vq.decode_tokens(ids)        # back to [-1, 1] pixels

They are never trained and never written to a checkpoint (the Lightning module drops them from its
state dict). The contract the rest of latentdiff uses is `Autoencoder` (what the backbone reads, what a latent
store holds, how a batch becomes the backbone's input); the tokenizer is its sibling, not a branch.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from latentdiff.latent_norm import model_latents, read_latents_stats, vae_latents
from latentdiff.ldm_vae import load_ldm_vae
from latentdiff.utils import artefact_not_loaded

DTYPES = {  # the dtype names a config may give (vae.dtype, text_encoder.dtype)
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class Autoencoder(nn.Module):
    """The autoencoder contract; the defaults are those of the continuous autoencoders (moments -> latents).

    - `output_kind`: what the backbone reads, "latents" (float (B, C, h, w)) or "tokens" (int64 ids (B, h, w));
      it equals the backbone's `input_kind`.
    - `store_key`, `store_dtype`, `store_shape(size)`: the array a latent store holds per image view.
    - `encode_for_store(images)`: (B, ...) that array for images in [-1, 1].
    - `model_input(batch)`: the backbone's input from a batch of images or of stored arrays.
    """

    output_kind: ClassVar[str] = "latents"
    store_key: ClassVar[str] = "moments"  # (n, F, 2C, h, w) float16: mean ++ logvar of each view
    store_dtype: ClassVar[Any] = np.float16
    latent_channels: int
    downsample_factor: int

    def store_shape(self, size: int) -> tuple[int, ...]:
        """The stored array of one image view, for a latent grid of `size` x `size`."""
        return (2 * self.latent_channels, size, size)

    def encode_for_store(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 2C, h, w) float16 moments of images in [-1, 1]."""
        return self.encode_moments(images).to(torch.float16)

    def decode_output(self, x: torch.Tensor) -> torch.Tensor:
        """What the backbone's sampling produced (latents z) -> (B, 3, H, W) pixels in about [-1, 1]."""
        return self.decode(x.float())

    def token_facts(self) -> dict[str, int] | None:
        """What a token store records of its tokenizer (store.json `tokens`); None for continuous latents."""
        return None

    def model_input(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents z (B, C, h, w) from a batch of stored moments or of images."""
        if "moments" in batch:
            return self.sample(batch["moments"], generator=generator)
        return self.sample(self.encode_moments(batch["image"]), generator=generator)


class IdentityAutoencoder(Autoencoder):
    """Pixel-space runs (`vae=none`): latents are the images themselves.

    Args:
        channels: image channels (the latent channels too).
        scaling_factor: multiplies the pixels (1.0 keeps them in [-1, 1]).
        downsample_factor, latent_channels: the shape facts the config declares; checked, must be 1 and
            `channels`.
    """

    def __init__(
        self,
        channels: int = 3,
        scaling_factor: float = 1.0,
        downsample_factor: int = 1,
        latent_channels: int | None = None,
    ):
        super().__init__()
        _check_declared("downsample_factor", downsample_factor, 1, "the identity autoencoder")
        _check_declared("latent_channels", latent_channels, channels, "the identity autoencoder")
        self.latent_channels = channels
        self.downsample_factor = 1
        self.scaling_factor = float(scaling_factor)

    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, C, H, W); the posterior is a point mass, so the moments are the mean."""
        return images

    def sample(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return moments.float() * self.scaling_factor  # fp16 pixel stores: the run computes in fp32

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.scaling_factor

    def describe(self) -> dict:
        """Identity of the encoder (for a latent store's metadata; see `same_encoder`)."""
        return {"kind": "identity", "channels": self.latent_channels, "scaling_factor": self.scaling_factor}


class FrozenAutoencoderKL(Autoencoder):
    """A frozen diffusers `AutoencoderKL` (e.g. `stabilityai/sd-vae-ft-ema`) that owns its latent normalisation.

    Args:
        pretrained: hub id or local folder written by `save_pretrained`; with `ldm`, a checkpoint file.
        subfolder: folder inside `pretrained` (e.g. "vae" for a full Stable Diffusion repo).
        scaling_factor: overrides `vae.config.scaling_factor` (U-ViT's COCO models use 0.23010).
        dtype: weights and compute dtype ("float32", "float16", "bfloat16").
        downsample_factor, latent_channels: the shape facts the config declares (the data config reads
            them); checked against the loaded VAE.
        ldm: the LDM `ddconfig` of a checkpoint in the LDM layout (`latentdiff.ldm_vae`; LightningDiT's VA-VAE).
        latents_stats: a torch file of channel-wise `mean` and `std` (1, C, 1, 1) of the latents (LightningDiT's
            `latents_stats.pt`): latents are `(z - mean) / std * scaling_factor`, decoded back the same way.
    """

    def __init__(
        self,
        pretrained: str,
        subfolder: str | None = None,
        scaling_factor: float | None = None,
        dtype: str = "float32",
        downsample_factor: int | None = None,
        latent_channels: int | None = None,
        ldm: dict | None = None,
        latents_stats: str | None = None,
    ):
        super().__init__()
        from diffusers import AutoencoderKL

        self.dtype = _dtype(dtype)
        if ldm:
            vae = load_ldm_vae(pretrained, dict(ldm), self.dtype)
        else:
            vae = _from_pretrained(AutoencoderKL, pretrained, subfolder, self.dtype)
        self.vae = vae.eval().requires_grad_(False)
        self.pretrained = str(pretrained)
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else vae.config.scaling_factor)
        self.latent_channels = vae.config.latent_channels
        self.downsample_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        _check_declared("downsample_factor", downsample_factor, self.downsample_factor, pretrained)
        _check_declared("latent_channels", latent_channels, self.latent_channels, pretrained)
        self.latents_stats = latents_stats
        shift, scale = read_latents_stats(latents_stats, self.latent_channels) if latents_stats else (0.0, 1.0)
        self.register_buffer("shift", torch.as_tensor(shift, dtype=torch.float32), persistent=False)
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32), persistent=False)

    def train(self, mode: bool = True) -> FrozenAutoencoderKL:
        # frozen: Lightning calls .train() on the whole module at the start of each epoch
        return super().train(False)

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 2C, H/f, W/f): posterior mean and log-variance, concatenated."""
        return self.vae.encode(images.to(self.dtype)).latent_dist.parameters.float()

    @torch.no_grad()
    def sample(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw mean + std * eps from (B, 2C, h, w) moments, normalised (`latent_norm.model_latents`: times the
        scaling factor, after the channel statistics); returns (B, C, h, w) fp32."""
        mean, logvar = moments.float().chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # the clamp of diffusers' DiagonalGaussianDistribution
        where = generator.device if generator is not None else mean.device  # a CPU generator on a GPU run
        eps = torch.randn(mean.shape, generator=generator, device=where, dtype=mean.dtype).to(mean.device)
        return model_latents(mean + std * eps, self.scaling_factor, self.shift, self.scale)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) scaled latents -> (B, 3, H, W) pixels in about [-1, 1], fp32."""
        z = vae_latents(latents, self.scaling_factor, self.shift, self.scale)
        return self.vae.decode(z.to(self.dtype)).sample.float()

    def describe(self) -> dict:
        """Identity of the encoder (for a latent store's metadata; see `same_encoder`).

        Only the encoder and `quant_conv` make the stored moments, so they alone are probed: sd-vae-ft-ema and
        sd-vae-ft-mse (same encoder, fine-tuned decoders) share stores. The probe is a few values of every
        tensor, compared with a tolerance that survives loading in fp16 or bf16.
        """
        named = [*self.vae.encoder.named_parameters("encoder"), *self.vae.quant_conv.named_parameters("quant_conv")]
        return {
            "kind": "AutoencoderKL",
            "pretrained": self.pretrained,
            "scaling_factor": self.scaling_factor,
            "latent_channels": self.latent_channels,
            "downsample_factor": self.downsample_factor,
            "encoder_probe": _probe(named),
        }


class FrozenVQModel(Autoencoder):
    """A frozen diffusers `VQModel` (a VQ-GAN such as aMUSEd's `amused/amused-256`, subfolder `vqvae`) that turns
    images into codebook ids and back.

    Args:
        pretrained: hub id or local folder written by `save_pretrained`; None builds a `VQModel(**config)` with
            random weights seeded by `init_seed` (a stand-in to run the mechanics offline: its tokens are a fixed
            function of the image, its decoded images mean little).
        subfolder: folder inside `pretrained` ("vqvae" for the aMUSEd repositories).
        dtype: weights and compute dtype ("float32", "float16", "bfloat16").
        pixel_range: [low, high] the VQ-GAN's images are in: [0, 1] for aMUSEd (its pipeline does not normalize),
            [-1, 1] for the taming / LDM VQ-GANs. The wrapper maps the project's [-1, 1] images to it and back.
        config, init_seed: the `VQModel` arguments and the seed of a randomly initialised tokenizer (pretrained=None).
        codebook_size, downsample_factor, latent_channels: the facts the config declares (the model and data
            configs read them); checked against the loaded VQ model.
    """

    output_kind = "tokens"
    store_key = "tokens"  # (n, F, h, w) uint16 codebook ids of each view
    store_dtype = np.uint16

    def __init__(
        self,
        pretrained: str | None,
        subfolder: str | None = None,
        dtype: str = "float32",
        pixel_range: tuple[float, float] = (0.0, 1.0),
        config: dict | None = None,
        init_seed: int = 0,
        codebook_size: int | None = None,
        downsample_factor: int | None = None,
        latent_channels: int | None = None,
    ):
        super().__init__()
        from diffusers import VQModel

        torch_dtype = _dtype(dtype)
        low, high = (float(v) for v in pixel_range)
        if not high > low:
            raise ValueError(f"vae.pixel_range={list(pixel_range)} must be [low, high] with low < high, e.g. [0, 1]")
        if pretrained:
            vq = _from_pretrained(VQModel, pretrained, subfolder, torch_dtype)
        elif config:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(init_seed))
                vq = VQModel(**{k: list(v) if isinstance(v, (list, tuple)) else v for k, v in dict(config).items()})
            vq = vq.to(torch_dtype) if torch_dtype != torch.float32 else vq
        else:
            raise ValueError("vae.pretrained=null needs vae.config (a randomly initialised VQModel); set one of them")
        self.vq = vq.eval().requires_grad_(False)
        self.pretrained = str(pretrained) if pretrained else f"random VQModel (init_seed={int(init_seed)})"
        self.dtype = torch_dtype
        self.pixel_range = (low, high)
        self.codebook_size = int(vq.config.num_vq_embeddings)
        self.downsample_factor = 2 ** (len(vq.config.block_out_channels) - 1)
        self.latent_channels = int(vq.config.vq_embed_dim or vq.config.latent_channels)
        _check_declared("codebook_size", codebook_size, self.codebook_size, self.pretrained)
        _check_declared("downsample_factor", downsample_factor, self.downsample_factor, self.pretrained)
        _check_declared("latent_channels", latent_channels, self.latent_channels, self.pretrained)

    def train(self, mode: bool = True) -> FrozenVQModel:
        return super().train(False)  # frozen, whatever Lightning asks

    def _to_vq(self, images: torch.Tensor) -> torch.Tensor:
        low, high = self.pixel_range
        return ((images.float() + 1.0) * 0.5 * (high - low) + low).to(self.dtype)

    def _from_vq(self, images: torch.Tensor) -> torch.Tensor:
        low, high = self.pixel_range
        return (images.float() - low) / (high - low) * 2.0 - 1.0

    @torch.no_grad()
    def encode_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, H/f, W/f) int64 ids of the nearest codebook vectors."""
        with torch.autocast(images.device.type, enabled=False):  # the ids of the tokenizer's dtype, not autocast's
            h = self.vq.encode(self._to_vq(images)).latents  # (B, D, h, w)
            _, _, (_, _, ids) = self.vq.quantize(h)  # ids flattened (B * h * w,)
        return ids.reshape(h.shape[0], h.shape[2], h.shape[3]).long()

    @torch.no_grad()
    def decode_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, h, w) codebook ids -> (B, 3, H, W) pixels in about [-1, 1], fp32."""
        if bool(((ids < 0) | (ids >= self.codebook_size)).any()):  # one read-back
            raise ValueError(f"token ids must be in [0, {self.codebook_size}): the mask token cannot be decoded")
        shape = (*ids.shape, self.latent_channels)  # (B, h, w, D)
        if self.vq.config.lookup_from_codebook:  # aMUSEd's VQ-GAN: decode() looks the ids up itself
            dec = self.vq.decode(ids, force_not_quantize=True, shape=shape).sample
        else:
            quant = self.vq.quantize.get_codebook_entry(ids.reshape(-1), shape)  # (B, D, h, w)
            dec = self.vq.decode(quant.to(self.dtype), force_not_quantize=True).sample
        return self._from_vq(dec)

    def store_shape(self, size: int) -> tuple[int, ...]:
        return (size, size)

    def decode_output(self, x: torch.Tensor) -> torch.Tensor:
        """Sampled token ids (B, h, w) -> pixels (`decode_tokens`)."""
        return self.decode_tokens(x)

    def token_facts(self) -> dict[str, int] | None:
        return {"codebook_size": self.codebook_size, "downsample_factor": self.downsample_factor}

    def encode_for_store(self, images: torch.Tensor) -> torch.Tensor:
        """(B, h, w) int32 codebook ids (stored as uint16) of images in [-1, 1]."""
        return self.encode_tokens(images).to(torch.int32)

    def model_input(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """Token ids (B, h, w) from a batch of stored ids or of images."""
        if "tokens" in batch:
            return batch["tokens"]
        if "image" not in batch:
            raise ValueError("the run's vae is a VQ model but the data holds VAE moments; use a token store")
        return self.encode_tokens(batch["image"])

    def describe(self) -> dict:
        """Identity of the tokenizer (for a token store's metadata; see `same_encoder`): the ids depend on the
        encoder, `quant_conv` and the codebook, so those are probed."""
        named = [
            *self.vq.encoder.named_parameters("encoder"),
            *self.vq.quant_conv.named_parameters("quant_conv"),
            *self.vq.quantize.named_parameters("quantize"),
        ]
        return {
            "kind": "VQModel",
            "pretrained": self.pretrained,
            "codebook_size": self.codebook_size,
            "downsample_factor": self.downsample_factor,
            "latent_channels": self.latent_channels,
            "pixel_range": list(self.pixel_range),
            "encoder_probe": _probe(named),
        }


def _probe(named: list[tuple[str, torch.Tensor]]) -> list[float]:
    """A few values of every tensor, in name order: an identity that survives fp16 / bf16 loading."""
    probe = []
    for _, param in sorted(named, key=lambda item: item[0]):
        flat = param.detach().float().flatten()
        picks = torch.linspace(0, flat.numel() - 1, min(4, flat.numel())).long()
        probe += [round(float(v), 6) for v in flat[picks]]
    return probe


def same_encoder(a: dict, b: dict) -> bool:
    """Whether two `describe()` results name the same encoder (moments from one are valid for the other)."""
    if a.get("kind") != b.get("kind"):
        return False
    if a["kind"] == "identity":
        return a.get("channels") == b.get("channels")
    if a["kind"] == "VQModel" and any(a.get(k) != b.get(k) for k in ("codebook_size", "pixel_range")):
        return False  # another codebook, or the same encoder fed differently scaled images
    pa, pb = torch.tensor(a.get("encoder_probe", [])), torch.tensor(b.get("encoder_probe", []))
    return pa.shape == pb.shape and bool(torch.allclose(pa, pb, rtol=2e-2, atol=2e-3))


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"vae.dtype={name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _from_pretrained(cls: type, pretrained: str, subfolder: str | None, dtype: torch.dtype) -> nn.Module:
    """A diffusers model from a hub id or a local folder; offline or wrong, a one-line error saying what to do."""
    try:
        return cls.from_pretrained(pretrained, subfolder=subfolder, torch_dtype=dtype, low_cpu_mem_usage=False)
    except (OSError, ValueError) as err:
        alternative = f"or `{cls.__name__}.from_pretrained(...).save_pretrained(<dir>)`"
        raise artefact_not_loaded("vae.pretrained", pretrained, err, alternative) from None


def _check_declared(key: str, declared: int | None, actual: int, what: str) -> None:
    """A fact the config declares (it is interpolated elsewhere before the model is loaded) must be the model's."""
    if declared is not None and int(declared) != int(actual):
        raise ValueError(f"vae.{key}={declared} does not match {what}, which has {actual}; set vae.{key}={actual}")
