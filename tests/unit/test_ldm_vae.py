"""An autoencoder checkpoint in the LDM layout (LightningDiT's VA-VAE) runs as diffusers' `AutoencoderKL` with the
official outputs, and its latents are normalised per channel as LightningDiT trains on them.

`tests/data/ldm_vae_reference.json`: the official `tokenizer/autoencoder.py` of github.com/hustvl/LightningDiT
(commit in `_meta`), run outside this repository on a tiny ddconfig that keeps VA-VAE's structure (self-attention
inside the 16 px levels), with `deterministic_state_dict` weights; its encoder's posterior and decoder's output."""

from __future__ import annotations

import json

import pytest
import torch

from latentdiff.autoencoder import FrozenAutoencoderKL
from latentdiff.errors import ConfigError

from ..conftest import ROOT
from ..helpers.reference import deterministic_state_dict

REFERENCE = json.loads((ROOT / "tests" / "data" / "ldm_vae_reference.json").read_text())


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    return x, torch.randn(1, 4, 16, 16, generator=g)


@pytest.fixture
def checkpoint(tmp_path):
    """A training checkpoint of the official code: the autoencoder under `state_dict`, with its loss's weights."""
    state = deterministic_state_dict(REFERENCE["shapes"])
    path = tmp_path / "vavae.pt"
    torch.save({"state_dict": {**state, "loss.logvar": torch.zeros(()), "loss.discriminator.w": torch.ones(2)}}, path)
    return path


def test_the_ldm_layout_gives_the_official_outputs(checkpoint):
    vae = FrozenAutoencoderKL(str(checkpoint), ldm=REFERENCE["ddconfig"], scaling_factor=1.0)
    assert vae.latent_channels == 4 and vae.downsample_factor == 2
    x, z = _inputs()
    mean, logvar = vae.encode_moments(x).chunk(2, dim=1)
    torch.testing.assert_close(mean.flatten(), torch.tensor(REFERENCE["mean"]), rtol=0, atol=2e-5)
    torch.testing.assert_close(logvar.flatten(), torch.tensor(REFERENCE["logvar"]), rtol=0, atol=2e-5)
    torch.testing.assert_close(vae.decode(z).flatten(), torch.tensor(REFERENCE["decoded"]), rtol=0, atol=2e-5)


def test_latents_are_normalised_per_channel_as_lightningdit_does(checkpoint, tmp_path):
    shift, scale = torch.tensor([0.5, -1.0, 0.0, 2.0]), torch.tensor([2.0, 0.5, 1.0, 4.0])
    torch.save({"mean": shift.view(1, 4, 1, 1), "std": scale.view(1, 4, 1, 1)}, tmp_path / "latents_stats.pt")
    stats = str(tmp_path / "latents_stats.pt")
    vae = FrozenAutoencoderKL(str(checkpoint), ldm=REFERENCE["ddconfig"], scaling_factor=0.5, latents_stats=stats)
    x, z = _inputs()
    moments = vae.encode_moments(x)
    mean = moments[:, :4]
    certain = torch.cat([mean, torch.full_like(mean, -30.0)], dim=1)  # logvar -30: the sample is the mean
    expected = (mean - shift.view(1, 4, 1, 1)) / scale.view(1, 4, 1, 1) * 0.5  # (x - mean) / std * multiplier
    torch.testing.assert_close(vae.sample(certain), expected, rtol=1e-6, atol=1e-5)
    latents = (z - shift.view(1, 4, 1, 1)) / scale.view(1, 4, 1, 1) * 0.5
    torch.testing.assert_close(vae.decode(latents).flatten(), torch.tensor(REFERENCE["decoded"]), rtol=0, atol=2e-5)


def test_what_does_not_fit_is_one_line(checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"^vae\.ldm\.z_channels is not set: vae\.ldm needs ch, ch_mult, "):
        FrozenAutoencoderKL(str(checkpoint), ldm={k: v for k, v in REFERENCE["ddconfig"].items() if k != "z_channels"})
    wrong = {**REFERENCE["ddconfig"], "ch": 64}
    with pytest.raises(
        ValueError, match=r"does not fit vae\.ldm \(set vae\.ldm to the checkpoint's ddconfig\): \d+ shapes differ"
    ):
        FrozenAutoencoderKL(str(checkpoint), ldm=wrong)
    with pytest.raises(FileNotFoundError, match=r"vae\.pretrained=.*missing\.pt does not exist; download"):
        FrozenAutoencoderKL(str(tmp_path / "missing.pt"), ldm=REFERENCE["ddconfig"])
    torch.save({"mean": torch.zeros(3)}, tmp_path / "bad_stats.pt")
    with pytest.raises(ValueError, match=r"must hold 'mean' and 'std' tensors of 4 values"):
        FrozenAutoencoderKL(str(checkpoint), ldm=REFERENCE["ddconfig"], latents_stats=str(tmp_path / "bad_stats.pt"))
    with pytest.raises(FileNotFoundError, match=r"vae\.latents_stats=.*download the autoencoder's latent statistics"):
        FrozenAutoencoderKL(str(checkpoint), ldm=REFERENCE["ddconfig"], latents_stats=str(tmp_path / "none.pt"))
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "args": object}, tmp_path / "pickled.pt")
    with pytest.raises(ConfigError):  # weights_only=True: a pickled object is refused, not run
        FrozenAutoencoderKL(str(tmp_path / "pickled.pt"), ldm=REFERENCE["ddconfig"])
