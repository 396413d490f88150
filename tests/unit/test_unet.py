"""The diffusers UNet adapters: equal to the raw diffusers models, conditioning, round trips, presets."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from latentdiff.config import register_resolvers
from latentdiff.models.build import build_backbone
from latentdiff.models.unet import UNet, UNetCond

from ..conftest import CONF_DIR
from ..helpers.unet import TINY, TINY3, TINY_COND

WRAPPER_KEYS = {"_target_", "_convert_", "gradient_checkpointing", "channels_last", "pretrained"}


def _inputs(channels: int = 3, size: int = 32, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, channels, size, size, generator=g), torch.tensor([10, 900])[:batch]


@pytest.fixture
def compose_model(request: pytest.FixtureRequest) -> Callable[..., DictConfig]:
    """Compose `model=<preset>` with the given data facts, through the project's `compose_cfg` if present."""
    try:
        compose_cfg, plus = request.getfixturevalue("compose_cfg"), ""
    except pytest.FixtureLookupError:  # no conf/train.yaml fixture yet: compose the model group alone

        def compose_cfg(overrides: list[str]) -> DictConfig:
            register_resolvers()
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                return compose(overrides=overrides)

        plus = "+"

    def make(preset: str, latent_size: int, latent_channels: int, num_classes: int) -> DictConfig:
        return compose_cfg(
            [
                f"{plus}model={preset}",
                f"{plus}data.latent_size={latent_size}",
                f"{plus}data.latent_channels={latent_channels}",
                f"{plus}data.num_classes={num_classes}",
            ]
        )

    return make


def test_unet_equals_diffusers_model() -> None:
    torch.manual_seed(0)
    model = UNet(**TINY).eval()
    raw = UNet2DModel(**TINY).eval()
    raw.load_state_dict(model.unet.state_dict())
    x, t = _inputs()
    y = torch.tensor([1, 3])
    with torch.no_grad():
        out = model(x, t, y)
        assert out.shape == x.shape
        torch.testing.assert_close(out, raw(x, t, class_labels=y).sample, rtol=0, atol=0)


def test_unet_cond_equals_diffusers_model() -> None:
    torch.manual_seed(0)
    model = UNetCond(**TINY_COND).eval()
    raw = UNet2DConditionModel(**TINY_COND).eval()
    raw.load_state_dict(model.unet.state_dict())
    x, t = _inputs(channels=4, size=16)
    text = torch.randn(2, 7, 32)  # (B, L, D)
    with torch.no_grad():
        out = model(x, t, text)
        assert out.shape == x.shape
        torch.testing.assert_close(out, raw(x, t, encoder_hidden_states=text).sample, rtol=0, atol=0)


def test_class_conditioning_and_null_class() -> None:
    torch.manual_seed(0)
    model = UNet(**TINY).eval()
    x, t = _inputs()
    with torch.no_grad():
        out_a, out_b = model(x, t, torch.tensor([0, 0])), model(x, t, torch.tensor([1, 2]))
        assert not torch.allclose(out_a, out_b)
        assert model.null_class == 4  # the last row: num_class_embeds - 1
        torch.testing.assert_close(model(x, t), model(x, t, torch.tensor([4, 4])), rtol=0, atol=0)
    with pytest.raises(ValueError, match="class ids must be integers"):
        model(x, t, torch.zeros(2, 7, 32))


def test_no_classes_when_num_class_embeds_not_positive() -> None:
    model = UNet(**{**TINY, "num_class_embeds": -1}).eval()  # ld.with_null(0) == -1
    assert model.unet.class_embedding is None and model.null_class is None
    x, t = _inputs()
    with torch.no_grad():
        assert model(x, t).shape == x.shape
    with pytest.raises(ValueError, match="no class embedding"):
        model(x, t, torch.tensor([0, 1]))


def test_text_conditioning_and_errors() -> None:
    torch.manual_seed(0)
    model = UNetCond(**TINY_COND).eval()
    x, t = _inputs(channels=4, size=16)
    with torch.no_grad():
        out_a, out_b = model(x, t, torch.randn(2, 7, 32)), model(x, t, torch.randn(2, 5, 32))
    assert not torch.allclose(out_a, out_b)
    with pytest.raises(ValueError, match=r"\(B, L, 32\), got \(2, 7, 64\).*cross_attention_dim"):
        model(x, t, torch.randn(2, 7, 64))
    with pytest.raises(ValueError, match="needs text features"):
        model(x, t)


def test_text_model_with_classes() -> None:
    torch.manual_seed(0)
    model = UNetCond(**TINY_COND, num_class_embeds=3).eval()
    x, t = _inputs(channels=4, size=16)
    text = torch.randn(2, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, text), model(x, t, text, class_labels=torch.tensor([2, 2])))
        assert not torch.allclose(model(x, t, text), model(x, t, text, class_labels=torch.tensor([0, 1])))


def test_timesteps_scalar_fraction_and_shape() -> None:
    torch.manual_seed(0)
    model = UNet(**TINY).eval()
    x, _ = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, 500), model(x, torch.tensor([500, 500])), rtol=0, atol=0)
        torch.testing.assert_close(model(x, torch.tensor(7.0)), model(x, 7), rtol=0, atol=0)
        assert not torch.allclose(model(x, 0.5), model(x, 0))  # fractions are kept, not truncated
    with pytest.raises(ValueError, match="timesteps must be a scalar or"):
        model(x, torch.tensor([1, 2, 3]))


@pytest.mark.parametrize(("cls", "kwargs"), [(UNet, TINY), (UNetCond, TINY_COND)])
def test_save_pretrained_round_trip(cls: type, kwargs: dict, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = cls(**kwargs).eval()
    model.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path).eval()
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}
    assert isinstance(loaded, cls) and public(loaded.unet.config) == public(model.unet.config)
    x, t = _inputs(channels=kwargs["in_channels"], size=kwargs["sample_size"])
    cond = torch.tensor([0, 4]) if cls is UNet else torch.randn(2, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, cond), model(x, t, cond), rtol=0, atol=0)


def test_backward_finite_and_checkpointing_same_grads() -> None:
    torch.manual_seed(0)
    plain = UNet(**TINY)
    ckpt = UNet(**TINY, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t = _inputs()
    y = torch.tensor([1, 3])
    for model in (plain, ckpt):
        model(x.contiguous(memory_format=torch.channels_last), t, y).square().mean().backward()
    assert ckpt.unet.is_gradient_checkpointing
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_channels_last_input() -> None:
    torch.manual_seed(0)
    model = UNet(**TINY).eval()
    x, t = _inputs()
    with torch.no_grad():
        out = model(x.contiguous(memory_format=torch.channels_last), t)
        torch.testing.assert_close(out, model(x, t), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sample_size": 30}, r"^model.sample_size=30 is not divisible by 4 \(2\^\(number of down blocks"),
        ({"sample_size": [32, 31]}, r"^model.sample_size=\[32, 31\] is not divisible by 4"),
        ({"norm_num_groups": 12}, r"^model.norm_num_groups=12 must divide each of model.block_out_channels"),
        ({"patch_size": 2}, r"^model.patch_size is not an argument of diffusers.UNet2DModel"),
    ],
)
def test_bad_config_one_line_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err, torch.device("meta"):
        UNet(**{**TINY3, **kwargs})
    assert "\n" not in str(err.value)


def test_bad_input_size() -> None:
    model = UNet(**TINY).eval()
    with pytest.raises(ValueError, match=r"input size \(32, 31\) is not divisible by 2"):
        model(torch.randn(1, 3, 32, 31), 1)


@pytest.mark.parametrize(
    ("preset", "data", "num_params"),
    [  # golden parameter counts; data = (latent_size, latent_channels, num_classes)
        ("unet", (32, 3, 0), 35_746_307),  # = DDPM CIFAR-10 (google/ddpm-cifar10-32)
        ("unet", (32, 3, 10), 35_751_939),  # + an 11 x 512 class table
        ("unet_tiny", (32, 3, 4), 652_835),
        ("unet_cond", (32, 4, 0), 314_140_228),
        ("unet_cond_tiny", (32, 4, 0), 792_964),
    ],
)
def test_presets(compose_model: Callable[..., DictConfig], preset: str, data: tuple, num_params: int) -> None:
    cfg = compose_model(preset, *data)
    with torch.device("meta"):
        model = build_backbone(cfg.model)
    assert sum(p.numel() for p in model.parameters()) == num_params
    assert model.unet.config.sample_size == data[0] and model.unet.config.in_channels == data[1]
    expected_classes = data[2] + 1 if preset in ("unet", "unet_tiny") and data[2] > 0 else None
    assert model.unet.config.num_class_embeds == expected_classes
    # the preset lists every argument of the diffusers constructor, so `--cfg job` shows them all
    signature = set(inspect.signature(model.diffusers_cls.__init__).parameters) - {"self"}
    assert set(cfg.model) - WRAPPER_KEYS == signature
