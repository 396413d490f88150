"""sample.py and the FID callback: per-index determinism, resume, sharding, objectives end to end, bad input."""

from __future__ import annotations

import pytest
import torch

from latentdiff.samplers.conditions import class_labels
from latentdiff.samplers.image import module_sampler

from ..conftest import TINY_RUN
from ..helpers.sampling import sampling_module


def test_labels_are_per_index():
    a, b = class_labels([3, 9, 4], 1000, seed=1), class_labels([9], 1000, seed=1)
    assert a[1] == b[0] and len(set(class_labels(range(200), 1000, seed=1).tolist())) > 150
    assert class_labels([0, 5, 6], 4, 0, "balanced").tolist() == [0, 1, 2]
    assert class_labels([0, 1, 2], 4, 0, [3, 1]).tolist() == [3, 1, 3]


def test_cfg_with_w_1_equals_the_conditional_model(compose_cfg):
    from hydra.utils import instantiate

    module = sampling_module(compose_cfg, "sampler=ddim")
    cfg = compose_cfg([*TINY_RUN, "sampler=ddim"])
    labels = torch.tensor([0, 1, 2])
    guided = module_sampler(module, instantiate(cfg.sampler.scheduler), 3, guidance_scale=1.0).latents(
        [0, 1, 2], labels
    )
    backbone = module.sampling_backbone
    forced = []  # the conditional model alone, in a loop that never sees a null condition

    def conditional_only(x, t, cond):
        forced.append(cond)
        return backbone(x, t, labels)

    plain = module_sampler(module, instantiate(cfg.sampler.scheduler), 3, guidance_scale=1.0)
    assert plain.device.type == "cpu"
    plain.backbone = conditional_only
    plain.null_cond = lambda c: None
    torch.testing.assert_close(plain.latents([0, 1, 2], labels), guided, rtol=0, atol=0)
    assert all(c is not None and c.shape == (3,) for c in forced)


def test_model_pretrained_loads_weights_files_and_sets_the_official_offset(compose_cfg, tmp_path):
    from safetensors.torch import save_file

    from latentdiff.models.build import build_backbone

    torch.manual_seed(0)
    source = build_backbone(compose_cfg(TINY_RUN).model)
    torch.save(source.state_dict(), tmp_path / "official.pth")  # the official release format: a plain state dict
    save_file(source.state_dict(), str(tmp_path / "weights.safetensors"))
    for file in ("official.pth", "weights.safetensors"):
        loaded = build_backbone(compose_cfg([*TINY_RUN, f"model.pretrained={tmp_path / file}"]).model)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), source.state_dict().values()))
    # official latent presets add 1 to t when they load weights (trained on n = t + 1), not when trained here
    assert compose_cfg(["model=uvit_h2"]).model.timestep_offset == 0
    assert compose_cfg(["model=uvit_h2", "model.pretrained=x.pth"]).model.timestep_offset == 1
    assert compose_cfg(["model=uvit_h2", "model.pretrained=run/last.ckpt"]).model.timestep_offset == 0
    assert compose_cfg(["model=uvit_h2", "model.pretrained=w.safetensors"]).model.timestep_offset == 0
    with pytest.raises(ValueError, match=r"model.pretrained=.*official.pth does not fit the configured UViT: "):
        build_backbone(compose_cfg([*TINY_RUN, "model.depth=4", f"model.pretrained={tmp_path / 'official.pth'}"]).model)
    with pytest.raises(FileNotFoundError, match="https://github.com/baofff/U-ViT#pretrained-models"):
        build_backbone(compose_cfg([*TINY_RUN, f"model.pretrained={tmp_path / 'missing.pth'}"]).model)
