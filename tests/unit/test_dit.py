"""DiT backbone: equality with the official DiT, SiT and LightningDiT code, the official initialisation, the
paper's sizes and GFLOPs, LightningDiT's block options, the SiT time convention, config errors.

Golden values (tests/data/dit_reference.json) come from the official implementations (github.com/
facebookresearch/DiT and github.com/willisma/SiT `models.py`, github.com/hustvl/LightningDiT
`models/lightningdit.py`, at the commits named in the file's `_meta`, with timm), run outside this repository:
for each case, `torch.manual_seed(0)` then the official `DiT(**args)` or `SiT(**args)` (its initialised state
dict: per key the sum, the sum of squares and the first three values), or `LightningDiT(**args, use_*=...)`, then
`deterministic_state_dict` of its state-dict shapes loaded with `strict=True`, and the flattened output for the
inputs of `reference_inputs` (below). The official parameter counts of the 12 presets come from the same code.
"""

from __future__ import annotations

import json

import pytest
import torch

from latentdiff.flops import config_cost
from latentdiff.models.dit import DiT, dit_pos_embed_2d
from latentdiff.models.weights import load_pretrained

from ..conftest import ROOT
from ..helpers.reference import deterministic_state_dict

REFERENCE = json.loads((ROOT / "tests" / "data" / "dit_reference.json").read_text())
CASES = REFERENCE["cases"]
SIZES = {"s": "S", "b": "B", "l": "L", "xl": "XL"}
# DiT paper (Peebles & Xie 2023), Table 4: parameters (M) and GFLOPs (MACs) on 32x32x4 latents (256 px)
TABLE_4 = {
    "dit_s8": (33, 0.36), "dit_s4": (33, 1.41), "dit_s2": (33, 6.06),
    "dit_b8": (130, 1.42), "dit_b4": (130, 5.56), "dit_b2": (130, 23.01),
    "dit_l8": (458, 5.01), "dit_l4": (458, 19.70), "dit_l2": (458, 80.71),
    "dit_xl8": (675, 7.39), "dit_xl4": (675, 29.05), "dit_xl2": (675, 118.64),
}  # fmt: skip


def reference_inputs(args: dict) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, args["in_channels"], args["input_size"], args["input_size"], generator=g)
    return x, torch.tensor([1, args["num_classes"], 0])  # a class, the null class, class 0


def _ours(case: dict, **kwargs) -> DiT:
    convention = "sit" if case["official_class"] == "sit" else "dit"
    return DiT(**case["args"], time_convention=convention, **kwargs).eval()


@pytest.mark.parametrize("name", sorted(CASES))
def test_official_weights_give_the_official_outputs(name):
    case = CASES[name]
    model = _ours(case)
    state = deterministic_state_dict(case["shapes"])
    model.load_state_dict(state, strict=True)  # the official names, pos_embed included
    x, y = reference_inputs(case["args"])
    t = torch.tensor(case["t"])
    with torch.no_grad():
        sit = case["official_class"] == "sit"  # SiT's time (1: data) is 1 - t / 1000 here; its velocity negated
        out = -model(x, 1000.0 * (1.0 - t), y) if sit else model(x, t, y)
    assert list(out.shape) == case["output_shape"]
    expected = torch.tensor(case["output"]).view(out.shape)
    # float32 on outputs up to |4|: the golden values (the official code in float32, on an AVX512 Xeon) are up to
    # 1.04e-5 from this model run in float64, and this model in float32 is 1.01e-5 from them on an AMD EPYC (under
    # 1e-5 on the Xeon): 1e-5 is float32's own noise here, so the bar is twice it
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", sorted(n for n in CASES if "init" in CASES[n]))
def test_the_initialisation_is_the_official_one(name):
    """Same seed, same weights: the modules are created and initialised in the official order."""
    case = CASES[name]
    torch.manual_seed(0)
    state = _ours(case).state_dict()
    assert sorted(state) == sorted(case["init"])
    for key, (total, squares, first) in case["init"].items():
        value = state[key].double()
        assert float(value.sum()) == pytest.approx(total, abs=1e-4), key
        assert float(value.pow(2).sum()) == pytest.approx(squares, rel=1e-6, abs=1e-9), key
        assert value.flatten()[:3].tolist() == pytest.approx(first, abs=1e-7), key
    zeros = [k for k in state if "adaLN_modulation" in k or k.startswith("final_layer.linear")]
    assert zeros and all(not state[k].any() for k in zeros)  # adaLN-Zero: every block starts as the identity


def test_sin_cos_positions_put_the_column_first():
    emb = dit_pos_embed_2d(8, 3)  # (9, 8): tokens in row-major order; frequencies 1 and 1/100 per half
    col = torch.tensor([1.0, 0.01])
    expected = torch.cat([col.sin(), col.cos(), torch.zeros(2), torch.ones(2)])  # token 1: row 0, column 1
    torch.testing.assert_close(emb[1], expected)
    torch.testing.assert_close(emb[3], torch.cat([torch.zeros(2), torch.ones(2), col.sin(), col.cos()]))  # row 1


@pytest.mark.parametrize("preset", sorted(TABLE_4))
def test_paper_table_4_parameters_and_gflops(compose_cfg, preset):
    millions, gflops = TABLE_4[preset]
    cost = config_cost(compose_cfg([f"model={preset}", "data=imagenet256_latents", "vae=sd_ema"]))
    official = REFERENCE["official_params"][f"DiT-{SIZES[preset[4:-1]]}/{preset[-1]}"]
    pos_embed = (32 // int(preset[-1])) ** 2 * {"s": 384, "b": 768, "l": 1024, "xl": 1152}[preset[4:-1]]
    assert cost.params + pos_embed == official  # the official count includes the fixed positions (a parameter)
    assert official == pytest.approx(millions * 1e6, abs=1e6)  # the paper gives one rounded count per size
    # the paper's GFLOPs are fvcore's counts (MACs) to two decimals; ours (matmuls and convolutions) agree to 0.02%
    assert cost.gmacs == pytest.approx(gflops, rel=2e-4, abs=0.0065)
    assert cost.model == "DiT" and cost.input_shape == (4, 32, 32)


TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=3)
SWITCHES = ("swiglu", "rmsnorm", "rope", "qk_norm")


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_lightningdit_switch_trains_and_changes_the_output(switch):
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0]), torch.tensor([0, 3])
    torch.manual_seed(0)
    base = DiT(**TINY)
    torch.manual_seed(0)
    model = DiT(**TINY, **{switch: True})
    for m in (base, model):  # away from adaLN-Zero's identity start, so every part of the block counts
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
    shared = {k: v for k, v in base.state_dict().items() if k in model.state_dict()}
    shared = {k: v for k, v in shared.items() if v.shape == model.state_dict()[k].shape}
    model.load_state_dict(shared, strict=False)
    out = model(x, t, y)
    assert out.shape == (2, 8, 8, 8) and torch.isfinite(out).all()
    assert not torch.allclose(out, base(x, t, y), atol=1e-4)  # the switch changes what the block computes
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_rope_rotates_pairs_by_row_and_column():
    model = DiT(**TINY, rope=True)
    rope = model.rope
    q = torch.randn(1, 1, 16, 8)  # (B, H, L, head_dim): a 4x4 grid
    rotated = rope(q)
    assert torch.allclose(rotated.norm(dim=-1), q.norm(dim=-1), atol=1e-5)  # a rotation keeps the norm
    assert torch.allclose(rotated[:, :, 0], q[:, :, 0])  # token (0, 0): no rotation
    # relative: <R(m) q, R(n) k> depends on m - n only (same row, columns 0->1 and 2->3)
    k = torch.randn(1, 1, 16, 8)
    q1, k1 = q.clone(), k.clone()
    k1[:, :, 1], q1[:, :, 3] = k[:, :, 0], q[:, :, 2]
    a = (rope(q)[:, :, 2] * rope(k)[:, :, 0]).sum()
    b = (rope(q1)[:, :, 3] * rope(k1)[:, :, 1]).sum()
    assert torch.allclose(a, b, atol=1e-5)


def test_sit_time_and_velocity_are_sits():
    torch.manual_seed(0)
    sit = DiT(**TINY, time_convention="sit")
    dit = DiT(**TINY)
    dit.load_state_dict(sit.state_dict())
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sit.load_state_dict(dit.state_dict())
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 3])
    ours = torch.tensor([250.0, 900.0])  # this project's flow time: 1000 is noise
    out = sit(x, ours, y)
    assert out.shape == (2, 4, 8, 8) and not sit.learns_variance  # SiT returns the velocity only
    assert torch.allclose(out, -dit(x, torch.tensor([0.75, 0.1]), y)[:, :4], atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"patch_size": 3}, "model.patch_size=3 does not divide the input size 8; use one of 1, 2, 4, 8"),
        ({"num_heads": 5}, "model.hidden_size=32 is not a multiple of model.num_heads=5"),
        ({"rope": True, "num_heads": 16}, "model.rope=true needs a head width"),
        ({"class_dropout_prob": 0.0}, "model.class_dropout_prob=0.0 leaves no null class"),
        ({"time_convention": "edm"}, "model.time_convention='edm' is not allowed; use one of 'dit', 'sit'"),
    ],
)
def test_bad_arguments_are_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DiT(**{**TINY, **kwargs})


def test_class_ids_are_checked():
    model = DiT(**TINY)
    with pytest.raises(ValueError, match=r"cond must be \(B,\) class ids \(the null class is 3\)"):
        model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), None)
    assert model.class_rows == 4 and model.condition == "class" and model.learns_variance


@pytest.mark.parametrize("name", sorted(n for n in CASES if "forward_with_cfg" in CASES[n]))
def test_guidance_on_three_channels_is_the_official_forward_with_cfg(name):
    from latentdiff.samplers.cfg import guided_output

    case = CASES[name]
    model = _ours(case, guidance_channels=3)
    model.load_state_dict(deterministic_state_dict(case["shapes"]))
    x, _ = reference_inputs(case["args"])
    t, null = torch.tensor(case["t"][:1]), torch.tensor([case["args"]["num_classes"]])
    if case["official_class"] == "sit":
        t = 1000.0 * (1.0 - t)
    with torch.no_grad():
        out = guided_output(model, x[:1], t, torch.tensor([1]), null, case["cfg_scale"])
    if case["official_class"] == "sit":
        out = -out
    expected = torch.tensor(case["forward_with_cfg"]).view(2, *out.shape[1:])[:1]  # the conditional half
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_sin_cos_positions_are_the_official_function_s():
    official = REFERENCE["official_pos_embed"]  # MAE's get_2d_sincos_pos_embed, as DiT's models.py calls it
    ours = dit_pos_embed_2d(official["dim"], official["grid"])[official["tokens"]]
    torch.testing.assert_close(ours, torch.tensor(official["rows"]), rtol=0, atol=1e-6)


def test_a_lightningdit_training_checkpoint_loads_with_model_pretrained(tmp_path):
    """LightningDiT's train.py saves {"model", "ema", "opt", "config"}, its state dicts with the rotary tables
    (feat_rope.*): `model.pretrained=` takes the EMA, checks the tables against this model's and drops them."""
    case = CASES["lightningdit_rope"]
    tables = {k: torch.tensor(v) for k, v in REFERENCE["official_rope"].items() if k.startswith("feat_rope.")}
    state = {**deterministic_state_dict(case["shapes"]), **tables}
    ckpt = {"model": {}, "ema": state, "opt": {"param_groups": []}, "config": {"model": {"model_type": "x"}}}
    torch.save(ckpt, tmp_path / "0080000.pt")
    model = _ours(case)
    load_pretrained(model, tmp_path / "0080000.pt")
    x, y = reference_inputs(case["args"])
    with torch.no_grad():
        out = model(x, torch.tensor(case["t"]), y)
    torch.testing.assert_close(out, torch.tensor(case["output"]).view(out.shape), rtol=0, atol=1e-5)
    bigger = DiT(**{**case["args"], "input_size": 16}, time_convention="dit")  # another grid: other tables
    torch.save({"ema": {**state, "pos_embed": bigger.pos_embed}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"feat_rope\.freqs_cos \(16, 16\) is not this model's \(64, 16\)"):
        load_pretrained(bigger, tmp_path / "other.pt")


@pytest.mark.parametrize(
    ("preset", "official", "data"),
    [
        ("sit_xl2", "SiT-XL/2", ["vae=sd_ema", "diffusion=flow"]),  # 32x32x4 SD-VAE latents
        ("lightningdit_b1", "LightningDiT-B/1", ["vae=vavae_f16d32", "diffusion=flow_logit_normal"]),  # 16x16x32
        ("lightningdit_xl1", "LightningDiT-XL/1", ["vae=vavae_f16d32", "diffusion=flow_logit_normal"]),
    ],
)
def test_sit_and_lightningdit_presets_count_the_official_parameters(compose_cfg, preset, official, data):
    """The official constructors' counts (SiT's models.py, LightningDiT's lightningdit.py with its released
    options, on the latents the vae config gives: VA-VAE's 16x16x32 reshape LightningDiT)."""
    cost = config_cost(compose_cfg([f"model={preset}", "data=imagenet256_latents", *data]))
    hidden = {"sit_xl2": 1152, "lightningdit_b1": 768, "lightningdit_xl1": 1152}[preset]
    assert cost.input_shape == ((4, 32, 32) if preset == "sit_xl2" else (32, 16, 16))
    assert cost.params + 256 * hidden == REFERENCE["official_params"][official]  # + the fixed positions (256 tokens)
    # 256 tokens at XL's or B's width: the compute of DiT-XL/2 (118.64 in Table 4) or DiT-B/2 (23.01)
    assert cost.gmacs == pytest.approx(118.64 if "xl" in preset else 23.01, rel=2e-4, abs=0.0065)
