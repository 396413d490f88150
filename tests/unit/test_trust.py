"""A file someone shares never chooses what code runs (`latentdiff.trust`, `weights_only=True` everywhere).

Each payload would create a marker file if it ran. A positive control shows that each one is live (Hydra's
`instantiate` or `torch.load(weights_only=False)` does create the marker); then every entry that reads such
a file refuses it in one `error:` line naming the file, and no marker exists afterwards.
"""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from hydra.utils import instantiate

from latentdiff import renames, trust

from ..conftest import CONF_DIR, TINY_RUN, compose_config
from ..helpers.trust import Touch, open_node, pickle_node


def test_the_payloads_are_live(tmp_path):
    for i, node in enumerate((open_node(tmp_path / "a"), pickle_node(tmp_path / "b"))):
        instantiate(node)
        assert (tmp_path / "ab"[i]).exists()  # Hydra builds them: this is what a stored config must not reach


def test_every_class_of_the_built_config_groups_is_allowed():
    """conf/model, vae, diffusion and sampler name only allowed classes (a new class needs its entry)."""
    found = {}

    def targets(node, where):
        if isinstance(node, dict):
            if "_target_" in node:
                found[node["_target_"]] = (where, bool(node.get("_partial_")))
            for value in node.values():
                targets(value, where)
        elif isinstance(node, list):
            for value in node:
                targets(value, where)

    for group in ("model", "vae", "diffusion", "sampler"):
        for file in (CONF_DIR / group).glob("*.yaml"):
            targets(yaml.safe_load(file.read_text()), file.name)
    assert len(found) >= 20
    for target, (where, partial) in found.items():
        assert target in trust.ALLOWED, f"{where}: {target} is not in latentdiff.trust.ALLOWED"
        assert (trust.ALLOWED[target] == "partial") == partial, target
        assert trust.locate(target) is not None


def test_an_allowed_config_builds_what_hydra_builds():
    cfg = compose_config([*TINY_RUN, "diffusion=cosine_v", "sampler=dpm_solver"])
    from omegaconf import OmegaConf

    diffusion = OmegaConf.to_container(cfg.diffusion, resolve=True)
    ours, hydras = trust.build(copy.deepcopy(diffusion), "x", "diffusion"), instantiate(cfg.diffusion)
    assert type(ours) is type(hydras) and dict(ours.scheduler.config) == dict(hydras.scheduler.config)
    sampler = trust.build(OmegaConf.to_container(cfg.sampler.scheduler, resolve=True), "x", "sampler.scheduler")
    built = sampler(ours.scheduler.config)
    assert dict(built.config) == dict(instantiate(cfg.sampler.scheduler)(hydras.scheduler.config).config)


def test_a_crafted_vae_folder_runs_no_code(tmp_path):
    """diffusers reads a folder's `.bin` weights with weights_only=True: a VAE folder whose weights file is a
    pickle payload is refused by the one loader of the frozen autoencoders, and the payload never runs."""
    from safetensors.torch import load_file

    from latentdiff.autoencoder import FrozenAutoencoderKL

    from ..artefacts import make_tiny_vae

    folder = make_tiny_vae(tmp_path / "vae")  # save_pretrained writes safetensors: replace them by a .bin
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "marker"
    torch.save({**state, "hook": Touch(marker)}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"vae.pretrained=.*could not be loaded"):
        FrozenAutoencoderKL(str(folder))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("overrides", "old"),
    [
        (["diffusion=cosine_v"], "latentdiff.diffusion.GaussianDiffusion"),
        (["diffusion=flow", "sampler=flow_euler"], "latentdiff.diffusion.FlowMatching"),
        (
            ["experiment=quickstart_tokens", "diffusion=masked_tokens", "sampler=amused"],
            "latentdiff.masking.MaskedTokens",
        ),
    ],
)
def test_a_config_stored_with_the_old_objective_names_builds_the_same_classes(overrides, old):
    """Checkpoints and exports written before the objectives moved name them by their old dotted paths."""
    from omegaconf import OmegaConf

    cfg = compose_config([*TINY_RUN, *overrides])
    current = OmegaConf.to_container(cfg.diffusion, resolve=True)
    assert renames.LEGACY_TARGETS[old] == current["_target_"] == renames.canonical_target(old)
    assert renames.canonical_target(current["_target_"]) == current["_target_"]
    stored = copy.deepcopy(current) | {"_target_": old}
    ours, theirs = trust.build(copy.deepcopy(stored), "x", "diffusion"), instantiate(cfg.diffusion)
    assert type(ours) is type(theirs) and dict(ours.scheduler.config) == dict(theirs.scheduler.config)
    config = {"diffusion": stored, "sampler": OmegaConf.to_container(cfg.sampler, resolve=True)}
    trust.check_stored(config, "x")  # renames in place: what sample.py and export read afterwards
    assert config["diffusion"] == current
