"""Files written before the redesign of issue 18 still load: checkpoints, exports and a latent store made by the
code of commit d965f91 (`tests/data/legacy/make_legacy.py`), read through the commands users run, give what that
code computed from them (`tests/data/legacy/expected/`).

The files are read in place, never written: a command that writes (a resumed run, sampling) gets a copy or an
`out=` under `tmp_path`. The store's tiny VAE is rebuilt (`make_tiny_vae(seed=0)`, the same weights) and handed
over as `vae.pretrained`: the store records the path it had when it was made, which no loader reads.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AmusedScheduler, DDPMScheduler, UVit2DModel

from latentdiff.export import load_exported
from latentdiff.models.build import build_backbone
from latentdiff.verify import verify_path

from ..conftest import compose_config
from ..helpers.legacy import EXPECTED, IO, LEGACY, tokens_out, uvit_out


def test_the_legacy_files_were_written_by_the_code_before_the_change():
    assert EXPECTED["commit"] == "d965f91"
    total = sum(p.stat().st_size for p in LEGACY.rglob("*") if p.is_file())
    assert total < 2_000_000


def test_legacy_checkpoints_load_as_model_pretrained():
    """A checkpoint's EMA weights through `model.pretrained=<last.ckpt>`: the outputs of its export."""
    cfg = compose_config([*EXPECTED["uvit_run"], f"model.pretrained={LEGACY / 'uvit_run' / 'last.ckpt'}"])
    torch.testing.assert_close(uvit_out(build_backbone(cfg.model)), torch.from_numpy(IO["uvit_out"]))
    cfg = compose_config([*EXPECTED["tokens_run"], f"model.pretrained={LEGACY / 'tokens_run' / 'last.ckpt'}"])
    torch.testing.assert_close(tokens_out(build_backbone(cfg.model)), torch.from_numpy(IO["tokens_out"]))


@pytest.mark.parametrize("name", ["uvit_run/last.ckpt", "tokens_run/last.ckpt", "uvit_run"])
def test_verify_passes_legacy_checkpoints(name):
    records = verify_path(LEGACY / name)
    files = EXPECTED["verify"]["uvit_run/last.ckpt"] if name == "uvit_run" else EXPECTED["verify"][name]
    assert [{k: r[k] for k in ("kind", "bytes")} for r in records] == files


# ---------------------------------------------------------------------------------------------- exports
def test_a_legacy_uvit_export_loads_every_way_with_the_same_outputs():
    export = LEGACY / "uvit_export"
    expected = torch.from_numpy(IO["uvit_out"])
    assert expected.shape == IO["uvit_x"].shape and IO["uvit_cond"][-1] == 4  # a class and the null class
    torch.testing.assert_close(uvit_out(load_exported(export)), expected)
    torch.testing.assert_close(uvit_out(load_exported(export / "backbone.safetensors")), expected)
    for pretrained in (export, export / "backbone.safetensors", export / "transformer"):
        cfg = compose_config([*EXPECTED["uvit_run"], f"model.pretrained={pretrained}"])
        torch.testing.assert_close(uvit_out(build_backbone(cfg.model)), expected, msg=str(pretrained))
    index = json.loads((export / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"] and index["_latentdiff"]["step"] == 2
    scheduler = DDPMScheduler.from_pretrained(export, subfolder="scheduler")
    stored = index["_latentdiff"]["config"]["diffusion"]["scheduler"]
    assert scheduler.config.num_train_timesteps == stored["num_train_timesteps"] == 1000
    assert scheduler.config.beta_schedule == stored["beta_schedule"]
    assert scheduler.config.prediction_type == stored["prediction_type"]


def test_a_legacy_token_export_loads_in_latentdiff_and_in_diffusers():
    export = LEGACY / "tokens_export"
    expected = torch.from_numpy(IO["tokens_out"])
    backbone = load_exported(export)
    torch.testing.assert_close(tokens_out(backbone), expected)
    cfg = compose_config([*EXPECTED["tokens_run"], f"model.pretrained={export}"])
    torch.testing.assert_close(tokens_out(build_backbone(cfg.model)), expected)
    ours = backbone.state_dict()
    theirs = UVit2DModel.from_pretrained(export, subfolder="transformer").state_dict()
    assert theirs and all(torch.equal(v, ours[f"transformer.{k}"]) for k, v in theirs.items())
    assert isinstance(AmusedScheduler.from_pretrained(export, subfolder="scheduler"), AmusedScheduler)
