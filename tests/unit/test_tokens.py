"""The masked-token backbone (diffusers UVit2DModel + VQModel + AmusedScheduler): equal to diffusers and to aMUSEd's
recipe, extraction -> training -> sampling -> evaluation on tiny artefacts, checkpoint round trip, one-line errors."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import AmusedScheduler
from omegaconf import OmegaConf

from latentdiff.ema import EMA
from latentdiff.models.build import build_backbone
from latentdiff.models.uvit2d import UVit2D
from latentdiff.objectives.masked_tokens import MaskedTokens

from ..artefacts import (
    TINY_VQ_CODES,
    TOKENS,
)
from ..conftest import compose_config
from ..helpers.tokens import TINY_UVIT2D


def test_masking_follows_the_amused_recipe():
    objective = MaskedTokens(AmusedScheduler(mask_token_id=TINY_VQ_CODES))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, TINY_VQ_CODES, (4, TOKENS, TOKENS), generator=g)
    r = torch.tensor([0.0, 0.5, 0.9, 1.0])
    u = torch.rand(x0.shape, generator=g)
    counts = objective.mask(x0, r, u).flatten(1).sum(1).tolist()
    expected = [max(1, round(64 * math.cos(math.pi / 2 * v))) for v in r.tolist()]  # round(L gamma), at least 1
    assert counts == expected == [64, 45, 10, 1]
    linear = MaskedTokens(AmusedScheduler(mask_token_id=64, masking_schedule="linear"), min_masking_rate=0.2)
    assert linear.mask(x0, r, u).flatten(1).sum(1).tolist() == [64, 32, 13, 13]  # 1 - r, at least 0.2
    logits = torch.randn(4, TINY_VQ_CODES, TOKENS, TOKENS, generator=g)
    seen = {}

    def model(ids, t, cond):
        seen["ids"] = ids
        return logits

    loss, per_image = objective.loss(model, x0, None, t=r, eps=u)
    masked = objective.mask(x0, r, u)
    assert torch.equal(seen["ids"], torch.where(masked, TINY_VQ_CODES, x0))  # the mask id where masked, else x0
    labels = torch.where(masked, x0, -100)  # train_amused.py: cross-entropy with ignore_index=-100
    flat = logits.permute(0, 2, 3, 1).reshape(-1, TINY_VQ_CODES)
    torch.testing.assert_close(loss, F.cross_entropy(flat, labels.reshape(-1), ignore_index=-100))
    first = F.cross_entropy(logits[:1].permute(0, 2, 3, 1).reshape(-1, TINY_VQ_CODES), x0[:1].reshape(-1))
    torch.testing.assert_close(per_image[0], first)  # image 0 is fully masked


def test_uvit2d_is_the_diffusers_model_and_loads_its_folders(tmp_path):
    torch.manual_seed(0)
    text = UVit2D(text_conditioning=True, micro_conds=[32, 32, 0, 0, 6], **TINY_UVIT2D).eval()
    ids = torch.randint(0, TINY_VQ_CODES + 1, (3, TOKENS, TOKENS))
    cond = torch.randn(3, 6, 16)  # 5 hidden-state rows and the pooled row
    micro = torch.tensor([[32.0, 32, 0, 0, 6]]).expand(3, -1)
    with torch.no_grad():
        reference = text.transformer(ids, cond[:, :-1], cond[:, -1], micro)
        logits = text(ids, torch.zeros(3), cond)
    assert logits.shape == (3, TINY_VQ_CODES, TOKENS, TOKENS) and torch.equal(logits, reference)
    text.transformer.save_pretrained(tmp_path / "transformer")  # a diffusers folder, as aMUSEd's transformer/
    (tmp_path / "model_index.json").write_text('{"_class_name": "AmusedPipeline"}')  # and the pipeline's root
    for folder in (tmp_path / "transformer", tmp_path):
        cfg = {"_target_": "latentdiff.models.uvit2d.UVit2D", "pretrained": str(folder)}
        cfg.update(text_conditioning=True, micro_conds=[32, 32, 0, 0, 6], **TINY_UVIT2D)
        loaded = build_backbone(OmegaConf.create(cfg))
        with torch.no_grad():
            assert torch.equal(loaded.eval()(ids, None, cond), logits)
    classes = UVit2D(num_class_embeds=4, **TINY_UVIT2D).eval()  # 3 classes + the null row
    with torch.no_grad():
        null = classes(ids, None, None)
        assert torch.equal(null, classes(ids, None, torch.full((3,), 3)))  # None is the null class
        assert not torch.allclose(null, classes(ids, None, torch.tensor([0, 1, 2])))


def test_presets_count_parameters_and_flops():
    from latentdiff.flops import config_cost

    quick = config_cost(compose_config(["experiment=quickstart_tokens"]))
    assert quick.params == 1_793_152 and quick.input_shape == (TOKENS, TOKENS) and quick.gmacs > 0.05
    amused = compose_config(["experiment=quickstart_tokens", "model=uvit2d", "vae=vq_amused256", "data.image_size=256"])
    with torch.device("meta"):
        text = build_backbone(OmegaConf.merge(amused.model, {"text_conditioning": True, "num_class_embeds": -1}))
    assert sum(p.numel() for p in text.parameters()) == 603_537_664  # aMUSEd-256's transformer (603.5M)
    assert config_cost(amused).input_shape == (16, 16)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    plain = UVit2D(num_class_embeds=4, **TINY_UVIT2D)
    checkpointed = UVit2D(num_class_embeds=4, gradient_checkpointing=True, **TINY_UVIT2D)
    checkpointed.load_state_dict(plain.state_dict())
    objective = MaskedTokens(AmusedScheduler(mask_token_id=TINY_VQ_CODES))
    x0 = torch.randint(0, TINY_VQ_CODES, (4, TOKENS, TOKENS))
    r, u, labels = torch.rand(4), torch.rand(4, TOKENS, TOKENS), torch.tensor([0, 1, 2, 3])
    losses = []
    for model in (plain, checkpointed):
        loss, _ = objective.loss(model, x0, labels, t=r, eps=u)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    copy = EMA(checkpointed).model  # a deep copy: its layers must run on its own weights
    with torch.no_grad():
        for p in checkpointed.transformer.transformer_layers.parameters():
            p.add_(1.0)
        assert not torch.allclose(copy(x0, None, labels), checkpointed(x0, None, labels))
        torch.testing.assert_close(copy(x0, None, labels), plain(x0, None, labels))
