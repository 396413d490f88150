"""The FLOP counter: published U-ViT figures, a hand count of a tiny U-ViT, meta vs real tensors, the command."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from latentdiff.flops import ModelCost, config_cost, dummy_cond, main, model_cost
from latentdiff.models.build import build_backbone
from latentdiff.models.uvit import UViT

# U-ViT paper (Bao et al. 2023), ImageNet 256x256 on 32x32x4 latents: (params, GFLOPs, which are MACs)
PUBLISHED = {
    "uvit_l2": (287e6, 76.5),
    "uvit_h2": (501e6, 133.2),
}
EXACT_PARAMS = {"uvit_l2": 286_763_172, "uvit_h2": 500_832_016}  # the official implementation's counts


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_published_uvit_figures(compose_cfg, preset):
    params, gmacs = PUBLISHED[preset]
    cost = config_cost(compose_cfg([f"model={preset}", "data=imagenet256_latents", "vae=sd_ema"]))
    assert cost.gmacs == pytest.approx(gmacs, rel=5e-3)
    assert round(cost.gmacs, 1) == gmacs  # the published figure to its one decimal
    assert cost.params == EXACT_PARAMS[preset]
    assert cost.params == pytest.approx(params, abs=0.5e6)
    assert cost.model == "UViT" and cost.input_shape == (4, 32, 32)
    assert cost.macs == pytest.approx(cost.gmacs * 1e9, abs=1)


def uvit_macs(
    D: int,
    depth: int,
    patch: int,
    chans: int,
    size: int,
    mlp_ratio: int = 4,
    classes: bool = False,
    text: tuple[int, int] | None = None,
    adaln: bool = False,
    mlp_time_embed: bool = False,
) -> int:
    """MACs of one U-ViT forward from its architecture (matmuls and convolutions only)."""
    n_patch = (size // patch) ** 2
    extras = (0 if adaln else 1) + (1 if classes else 0) + (text[0] if text else 0)
    L = n_patch + extras  # tokens in every block
    blocks = 2 * (depth // 2) + 1
    per_block = (
        L * D * 3 * D  # qkv
        + 2 * L * L * D  # q k^T and attn v, summed over the heads
        + L * D * D  # attention output projection
        + 2 * L * D * mlp_ratio * D  # fc1, fc2
        + (D * 4 * D if adaln else 0)  # scale and shift from the time embedding (one vector per image)
    )
    return (
        n_patch * (patch * patch * chans) * D  # patch embedding: a stride-P conv
        + blocks * per_block
        + (depth // 2) * L * 2 * D * D  # long skips: Linear(2D, D) on [h_m, h_s]
        + n_patch * D * patch * patch * chans  # decoder_pred
        + size * size * chans * chans * 9  # final 3x3 conv on the image
        + (2 * D * 4 * D if mlp_time_embed else 0)  # time MLP D -> 4D -> D
        + (text[0] * text[1] * D if text else 0)  # context_embed of the text tokens
    )


TINY = dict(img_size=32, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, dict()),
        ({"num_classes": 5}, dict(classes=True)),
        (
            {"clip_dim": 16, "num_clip_token": 5, "time_cond": "adaln", "mlp_time_embed": True},
            dict(text=(5, 16), adaln=True, mlp_time_embed=True),
        ),
        ({"depth": 4, "mlp_ratio": 2, "patch_size": 2}, dict(depth=4, mlp_ratio=2, patch=2)),
    ],
    ids=["uncond", "class", "text-adaln-mlptime", "deeper-patch2"],
)
def test_tiny_uvit_matches_a_hand_count(kwargs, expected):
    args = {**TINY, **kwargs}
    with torch.device("meta"):
        model = UViT(**args)
    spec = {"D": 32, "depth": 2, "patch": 4, "chans": 3, "size": 32, **expected}
    cost = model_cost(model, (3, 32, 32))
    assert cost.macs == uvit_macs(**spec)
    assert cost.gmacs == pytest.approx(uvit_macs(**spec) / 1e9, rel=1e-12)
    assert cost.params == sum(p.numel() for p in model.parameters())


def test_real_tensors_and_batches_count_the_same_as_meta():
    torch.manual_seed(0)
    model = UViT(**TINY, num_classes=5)
    real = model_cost(model, (3, 32, 32))  # CPU, real values (SDPA runs as one fused op here)
    meta = model_cost(UViT(**TINY, num_classes=5).to("meta"), (3, 32, 32), batch_size=3)
    assert real.macs == meta.macs == uvit_macs(D=32, depth=2, patch=4, chans=3, size=32, classes=True)
    assert real.params == meta.params
    assert model.training  # the mode is restored


def test_unet_config_meta_equals_real(compose_cfg):
    cfg = compose_cfg(["model=unet_tiny"])
    meta = config_cost(cfg)
    assert meta.model == "UNet" and meta.gmacs > 0 and meta.input_shape == (3, 32, 32)
    cfg.model.pretrained = None
    real_model = build_backbone(cfg.model)  # CPU, initialised weights
    real = model_cost(real_model, (3, 32, 32))
    assert real.macs == meta.macs and real.params == meta.params
    assert real.flops_by_op["aten.convolution"] == meta.flops_by_op["aten.convolution"]


def test_dummy_cond_follows_the_model():
    with torch.device("meta"):
        assert dummy_cond(UViT(**TINY)) is None
        ids = dummy_cond(UViT(**TINY, num_classes=5), batch_size=2)
        text = dummy_cond(UViT(**TINY, clip_dim=16, num_clip_token=5), batch_size=2)
    assert ids.shape == (2,) and ids.dtype == torch.long
    assert text.shape == (2, 5, 16) and text.is_floating_point()


class _NeedsValues(nn.Module):
    """A forward that reads a value (not possible on the meta device)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x, timesteps, cond=None):
        scale = 1.0 if x.abs().sum().item() >= 0 else 0.0
        return self.lin(x.flatten(1) * scale)


def test_a_forward_that_needs_values_falls_back_to_cpu():
    with torch.device("meta"):
        model = _NeedsValues()
    cost = model_cost(model, (2, 2, 2), batch_size=4)
    assert cost.macs == 8 * 4 and cost.params == 8 * 4 + 4
    assert model.lin.weight.is_meta  # the model itself is left on meta


def test_command_prints_the_summary_line(capsys, monkeypatch):
    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)
    main(["model=uvit_l2", "data=imagenet256_latents", "vae=sd_ema"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["model=UViT params=286.8M gmacs=76.5 input=4x32x32"]

    main(["model=uvit_l2,uvit_h2", "data=imagenet256_latents", "vae=sd_ema", "json=true"])
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [round(r["gmacs"], 1) for r in records] == [76.5, 133.2]
    assert records[1]["overrides"][0] == "model=uvit_h2" and records[1]["input"] == [4, 32, 32]
    assert sum(records[0]["flops_by_op"].values()) == pytest.approx(2 * records[0]["gmacs"] * 1e9, abs=2)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model=uvit_xxl"], "error: model=uvit_xxl is not a known option of 'model'"),
        (["model=uvit_tiny", "model.patch_size=3"], "error: model.patch_size=3 does not divide the input size 32"),
        (["model.no_such_key=1"], "error: Could not override 'model.no_such_key'"),
        (["json=maybe"], "error: json=maybe is not allowed"),
    ],
)
def test_command_errors_are_one_line(capsys, monkeypatch, args, message):
    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err


def test_model_cost_is_a_frozen_record():
    cost = ModelCost(params=10, gmacs=1.5, model="X", input_shape=(1, 2, 2))
    with pytest.raises(AttributeError):
        cost.gmacs = 2.0  # type: ignore[misc]
    assert cost.summary() == "model=X params=0.0000100M gmacs=1.50 input=1x2x2"
    assert ModelCost(params=286_763_172, gmacs=76.456, model="UViT", input_shape=(4, 32, 32)).summary() == (
        "model=UViT params=286.8M gmacs=76.5 input=4x32x32"
    )
