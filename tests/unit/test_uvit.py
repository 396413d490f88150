"""U-ViT backbone: equality with the official code, preset sizes, ablation switches, config errors.

Golden values (tests/data/uvit_reference.json) come from the official implementation
(github.com/baofff/U-ViT, libs/uvit.py and libs/uvit_t2i.py at the commit named in the file's `_meta`),
run outside this repository: for each case in the file, build the official `UViT(**args)`, load
`deterministic_state_dict` (`tests/helpers/reference.py`) of its state-dict shapes with `strict=True`, and record
the flattened output for the inputs of `reference_inputs` (below), at t = [3.0, 977.5] and at t = [1.0, 1000.0]. The
official parameter counts of the presets were computed the same way (official class, same arguments).
"""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from latentdiff.models.uvit import Block, UViT

from ..conftest import CONF_DIR, ROOT
from ..helpers.reference import deterministic_state_dict

REFERENCE = json.loads((ROOT / "tests" / "data" / "uvit_reference.json").read_text())["cases"]
CONF_MODEL = CONF_DIR / "model"


def reference_inputs(args: dict, text: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, args["in_chans"], args["img_size"], args["img_size"], generator=g)
    if text:
        cond = torch.randn(2, args["num_clip_token"], args["clip_dim"], generator=g)
    elif args["num_classes"] > 0:
        cond = torch.tensor([1, args["num_classes"] - 1])  # a class and the null class
    else:
        cond = None
    return x, torch.tensor([3.0, 977.5]), cond


def reference_model(name: str) -> tuple[UViT, dict]:
    case = REFERENCE[name]
    model = UViT(**case["args"]).eval()
    return model, case


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_matches_official_outputs(name: str) -> None:
    model, case = reference_model(name)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == case["state_dict_shapes"]  # same names and shapes: official checkpoints load
    assert sum(p.numel() for p in model.parameters()) == case["num_params"]
    model.load_state_dict(deterministic_state_dict(case["state_dict_shapes"]), strict=True)
    x, t, cond = reference_inputs(case["args"], case["official_class"] == "uvit_t2i")
    with torch.no_grad():
        y = model(x, t, cond)
    assert y.shape == x.shape
    torch.testing.assert_close(y.flatten(), torch.tensor(case["output"]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_timestep_offset_reproduces_official_latent_timesteps(name: str) -> None:
    # official latent models saw n in {1..1000}; diffusers t = n - 1 with timestep_offset=1 gives the same
    args = REFERENCE[name]["args"]
    model = UViT(**args, timestep_offset=1).eval()
    model.load_state_dict(deterministic_state_dict(REFERENCE[name]["state_dict_shapes"]), strict=True)
    x, _, cond = reference_inputs(args, "clip_dim" in args)
    with torch.no_grad():
        y = model(x, torch.tensor([0, 999]), cond)
    torch.testing.assert_close(y.flatten(), torch.tensor(REFERENCE[name]["output_at_n_1_1000"]), rtol=0, atol=1e-5)


def test_scalar_timesteps_broadcast() -> None:
    model, case = reference_model("class_cond")
    x, _, cond = reference_inputs(case["args"], False)
    with torch.no_grad():
        for scalar in (7, 7.0, torch.tensor(7.0)):
            torch.testing.assert_close(model(x, scalar, cond), model(x, torch.tensor([7, 7]), cond))


# preset: (data shape facts: latent_size, latent_channels, data.num_classes; official parameter count)
PRESETS = {
    # uvit_tiny: AdaLN adds 7 x Linear(128, 512) = 462,336 to the token-time 1,497,348; sincos positions are a buffer
    "uvit_tiny": ((32, 3, 4), 1_959_684),
    "uvit_s2": ((32, 3, 0), 44_255_328),
    "uvit_s4": ((64, 3, 0), 44_292_228),
    "uvit_m4": ((64, 3, 1000), 130_941_060),  # 1001 label rows; the official ImageNet-64 has 1000
    "uvit_l4": ((64, 3, 1000), 286_828_676),
    "uvit_l2": ((32, 4, 1000), 286_763_172),
    "uvit_h2": ((32, 4, 1000), 500_832_016),
    "uvit_l4_512": ((64, 4, 1000), 286_861_524),
    "uvit_h4_512": ((64, 4, 1000), 500_942_656),
    "uvit_s2_t2i": ((32, 4, 0), 44_692_644),
    "uvit_s2_t2i_deep": ((32, 4, 0), 58_345_636),
}


def test_every_preset_is_counted() -> None:
    assert sorted(p.stem for p in CONF_MODEL.glob("uvit_*.yaml")) == sorted(PRESETS)


def _model_cfg(request: pytest.FixtureRequest, preset: str, size: int, chans: int, classes: int) -> DictConfig:
    """The preset's resolved model node, composed through the config tree when conftest offers it."""
    data = {"latent_size": size, "latent_channels": chans, "num_classes": classes}
    try:
        compose_cfg = request.getfixturevalue("compose_cfg")
    except pytest.FixtureLookupError:
        from latentdiff.config import register_resolvers

        register_resolvers()
        cfg = OmegaConf.create({"data": data, "model": OmegaConf.load(CONF_MODEL / f"{preset}.yaml")})
        OmegaConf.resolve(cfg)
        return cfg.model
    cfg = compose_cfg([f"model={preset}", *(f"data.{k}={v}" for k, v in data.items())])
    return cfg.model


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_parameter_count_equals_official(request: pytest.FixtureRequest, preset: str) -> None:
    (size, chans, classes), expected = PRESETS[preset]
    node = OmegaConf.to_container(_model_cfg(request, preset, size, chans, classes), resolve=True)
    assert node.pop("_target_") == "latentdiff.models.uvit.UViT" and node.pop("pretrained") is None
    with torch.device("meta"):
        model = UViT(**node)
    assert sum(p.numel() for p in model.parameters()) == expected


def tiny(**kwargs) -> UViT:
    args = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=4, num_heads=4, num_classes=5)
    return UViT(**{**args, **kwargs})


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


ABLATIONS = (
    [{"skip": s} for s in (True, False, "concat_linear", "add", "linear_skip_add", "linear_after_add", "none")]
    + [{"conv": c} for c in (True, False, "after", "before", "none")]
    + [
        {"time_cond": "adaln"},
        {"time_cond": "adaln", "mlp_time_embed": True},
        {"patch_embed_type": "conv"},
        {"patch_embed_type": "conv", "patch_size": 1},
        {"patch_embed_type": "conv", "patch_size": 4},
        {"pos_embed_type": "sincos"},
        {"use_checkpoint": True},
        {"qk_scale": 0.1, "qkv_bias": True, "mlp_ratio": 2.5},
    ]
)


@pytest.mark.parametrize("kwargs", ABLATIONS, ids=lambda k: ",".join(f"{a}={v}" for a, v in k.items()))
def test_ablation_forward_backward(kwargs: dict) -> None:
    torch.manual_seed(0)
    model = tiny(**kwargs).train()
    x = torch.randn(2, 3, 8, 8)
    y = model(x, torch.tensor([10, 500]), torch.tensor([0, 4]))
    assert y.shape == x.shape
    y.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_skip_and_conv_parameter_differences() -> None:
    D, half, C = 32, 2, 3  # tiny(): depth 4 -> 2 out-blocks
    base = n_params(tiny())
    assert base - n_params(tiny(skip="none")) == half * (2 * D * D + D)
    assert n_params(tiny(skip="add")) == n_params(tiny(skip=False))
    for mode in ("linear_skip_add", "linear_after_add"):
        assert base - n_params(tiny(skip=mode)) == half * D * D
    assert base - n_params(tiny(conv="none")) == 9 * C * C + C
    assert n_params(tiny(conv="before")) - n_params(tiny(conv=False)) == 9 * D * D + D
    blocks, tokens = 5, 2 + 16
    assert n_params(tiny(time_cond="adaln")) - base == blocks * (4 * D * D + 4 * D) - D  # no time token
    assert base - n_params(tiny(pos_embed_type="sincos")) == tokens * D


@pytest.mark.parametrize("mode", ["concat_linear", "add", "linear_skip_add", "linear_after_add", "none"])
def test_skip_merge_formula(mode: str) -> None:
    torch.manual_seed(0)
    blk = Block(8, 2, 4.0, False, None, skip=mode)
    h_m, h_s = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    lin = blk.skip_linear
    expected = {
        "concat_linear": lambda: lin(torch.cat([h_m, h_s], -1)),
        "add": lambda: h_m + h_s,
        "linear_skip_add": lambda: h_m + lin(h_s),
        "linear_after_add": lambda: lin(h_m + h_s),
        "none": lambda: h_m,
    }[mode]()
    torch.testing.assert_close(blk.merge_skip(h_m, h_s), expected)


def test_adaln_uses_time_without_a_time_token() -> None:
    torch.manual_seed(0)
    model = tiny(time_cond="adaln").eval()
    assert model.extras == 1  # only the label token
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(model(x, 5, y), model(x, 900, y))  # zero-initialised modulation
        for blk in model.out_blocks:
            blk.ada_ln.weight.normal_()
        assert not torch.allclose(model(x, 5, y), model(x, 900, y))


def test_sincos_pos_embed_is_fixed_and_two_dimensional() -> None:
    model = tiny(pos_embed_type="sincos")
    assert "pos_embed" not in model.state_dict() and "pos_embed" not in dict(model.named_parameters())
    pe = model.pos_embed[0]  # (E + L, D), 2 extra tokens, 4 x 4 grid
    assert pe[:2].abs().max() == 0
    grid = pe[2:].reshape(4, 4, 32)
    torch.testing.assert_close(grid[:, :1, :16].expand(4, 4, 16), grid[..., :16])  # rows in the 1st half
    torch.testing.assert_close(grid[:1, :, 16:].expand(4, 4, 16), grid[..., 16:])  # columns in the 2nd
    assert not torch.allclose(grid[0, 0], grid[1, 1])


def test_conv_patch_embed_names() -> None:
    model = tiny(patch_embed_type="conv", patch_size=4)
    keys = {k for k in model.state_dict() if k.startswith("patch_embed")}
    assert keys == {
        "patch_embed.stem.0.weight",
        "patch_embed.stem.0.bias",
        "patch_embed.stem.2.weight",
        "patch_embed.stem.2.bias",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
    }


def test_checkpointing_gives_the_same_gradients() -> None:
    grads = []
    for use_checkpoint in (False, True):
        torch.manual_seed(0)
        model = tiny(use_checkpoint=use_checkpoint).train()
        x = torch.randn(2, 3, 8, 8)
        model(x, torch.tensor([3, 7]), torch.tensor([0, 1])).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        ({"skip": "concat"}, ["model.skip='concat'", "'concat_linear'", "'linear_after_add'", "False"]),
        ({"conv": "middle"}, ["model.conv='middle'", "'after'", "'before'", "'none'"]),
        ({"time_cond": "film"}, ["model.time_cond='film'", "'token'", "'adaln'"]),
        ({"patch_embed_type": "mlp"}, ["model.patch_embed_type='mlp'", "'linear'", "'conv'"]),
        ({"pos_embed_type": "rope"}, ["model.pos_embed_type='rope'", "'learned'", "'sincos'"]),
        ({"time_cond": None}, ["model.time_cond=None"]),
        ({"patch_size": 3}, ["model.patch_size=3 does not divide the input size 8; use one of 1, 2, 4, 8"]),
        ({"img_size": 12, "patch_size": 6, "patch_embed_type": "conv"}, ["model.patch_size=6", "power of 2"]),
        ({"num_heads": 5}, ["model.embed_dim=32", "model.num_heads=5"]),
        ({"clip_dim": 16}, ["model.clip_dim=16", "model.num_classes=-1"]),
    ],
)
def test_bad_config_values_raise(kwargs: dict, needles: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        tiny(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


def test_text_conditioning() -> None:
    torch.manual_seed(0)
    model = tiny(num_classes=-1, clip_dim=24, num_clip_token=77)
    x, text = torch.randn(2, 3, 8, 8), torch.randn(2, 77, 24)
    y = model(x, torch.tensor([1, 2]), text)
    assert y.shape == x.shape
    assert not torch.allclose(y, model(x, torch.tensor([1, 2]), torch.randn(2, 77, 24)))
    with pytest.raises(ValueError, match=r"\(B, 77, 24\)"):
        model(x, 1, None)


def test_class_and_unconditional_modes() -> None:
    torch.manual_seed(0)
    model, x = tiny(), torch.randn(2, 3, 8, 8)
    assert not torch.allclose(model(x, 1, torch.tensor([0, 1])), model(x, 1, torch.tensor([4, 4])))
    with pytest.raises(ValueError, match="null class is 4"):
        model(x, 1, None)
    uncond = tiny(num_classes=-1)
    assert uncond(x, torch.tensor([1.5, 2.5])).shape == x.shape
    with pytest.raises(ValueError, match="unconditional"):
        uncond(x, 1, torch.tensor([0, 1]))
