"""A DiT export as diffusers' `DiTTransformer2DModel`: the weights round trip, the outputs equal diffusers' once its
time embedding takes DiT's frequencies, and the difference it makes as it is."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiTTransformer2DModel

from latentdiff.models.dit import DiT
from latentdiff.models.dit_diffusers import save_transformer
from latentdiff.models.weights import load_pretrained
from latentdiff.pipeline import LatentdiffBackbone

ARGS = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=3)


def _dit(**kwargs) -> tuple[DiT, dict]:
    cfg = {"_target_": "latentdiff.models.dit.DiT", **ARGS, **kwargs}
    torch.manual_seed(0)
    model = DiT(**{k: v for k, v in cfg.items() if k != "_target_"}).eval()
    with torch.no_grad():  # away from adaLN-Zero's identity start
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model, cfg


def _dit_frequencies(model: DiTTransformer2DModel) -> DiTTransformer2DModel:
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0  # DiT's exponent / 128, not / 127
    return model


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_export_loads_in_diffusers_and_back(tmp_path, learn_sigma):
    model, cfg = _dit(learn_sigma=learn_sigma)
    save_transformer(model.state_dict(), cfg, tmp_path / "transformer")
    theirs = DiTTransformer2DModel.from_pretrained(tmp_path / "transformer").eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 250, 999]), torch.tensor([0, 2, 3])
    with torch.no_grad():
        ours = model(x, t, y)
        as_is = theirs(x, timestep=t, class_labels=y).sample
        same = _dit_frequencies(theirs)(x, timestep=t, class_labels=y).sample
    torch.testing.assert_close(same, ours, rtol=1e-5, atol=1e-5)  # the same network, weight for weight
    assert (as_is - ours).abs().max() > 1e-3  # diffusers' own time frequencies change the outputs
    back = DiT(**{k: v for k, v in cfg.items() if k != "_target_"})
    load_pretrained(back, tmp_path / "transformer")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("options", [{"swiglu": True}, {}], ids=["lightningdit", "dit"])
def test_a_dit_exports_as_a_latentdiff_backbone_that_diffusers_loads_exactly(tmp_path, options):
    """Every DiT's own export folder (LightningDiT's switches included) is a diffusers model with DiT's outputs."""
    model, cfg = _dit(**options)
    assert model.save_diffusers(tmp_path / "transformer", cfg) == ("latentdiff_backbone", "LatentdiffBackbone")
    assert json.loads((tmp_path / "transformer" / "config.json").read_text())["model"] == cfg
    back = DiT(**{k: v for k, v in cfg.items() if k != "_target_"})
    load_pretrained(back, tmp_path / "transformer")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    theirs = LatentdiffBackbone.from_pretrained(tmp_path / "transformer").eval()  # as diffusers loads it
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 250, 999]), torch.tensor([0, 2, 3])
    with torch.no_grad():
        assert torch.equal(theirs(x, t, y), model(x, t, y))
