"""Every config in conf/ composes, resolves as before (golden file) and instantiates; bad values give one-line
errors naming the key."""

from __future__ import annotations

import itertools
import json

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from latentdiff.models.build import build_backbone

from ..conftest import CONF_DIR
from ..resolved_configs import (
    GOLDEN,
    TRAIN_GROUPS,
    combinations,
    compose_all,
    composer,
    first_difference,
    key,
    option_overrides,
    options,
    resolved,
    sweep_base,
)

# groups of conf/train.yaml (text_encoder belongs to conf/extract.yaml; sweep presets hold Hydra's sweeper settings)
GROUPS = sorted(
    p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("hydra", "paths", "text_encoder", "sweep")
)


def test_every_selectable_config_resolves_as_the_golden_file():
    """Each model preset (default run and its data), experiment, sweep base, group option and entry config
    resolves to the values recorded in tests/data/resolved_configs.json, key by key."""
    golden, composed = json.loads(GOLDEN.read_text()), compose_all()
    assert sorted(composed) == sorted(golden), "combinations changed: python -m tests.resolved_configs"
    differences = [f"{k}: {d}" for k in golden if (d := first_difference(golden[k], composed[k])) is not None]
    assert not differences, f"{len(differences)} configs differ; first: {differences[0]}"


def test_every_sweep_preset_composes_and_builds_each_job():
    """A sweep preset is a multirun whose every job composes and builds its backbone (the ablation values are
    ones the U-ViT accepts); the Optuna preset's search space parses."""
    with composer() as compose:
        for sweep in options("sweep"):
            cfg = resolved("train", sweep_base(sweep))
            assert cfg.hydra.mode == "RunMode.MULTIRUN", sweep
            params = {k: str(v) for k, v in cfg.hydra.sweeper.params.items()}
            parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
            if sweep.startswith("optuna"):
                assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.objective == "val/loss_ema"
                continue
            axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in parsed]
            jobs = [list(j) for j in itertools.product(*axes)]
            assert len(jobs) >= 2, sweep
            base = [o for o in sweep_base(sweep) if not o.startswith("sweep=")]
            for job in jobs:
                job_cfg = compose([*base, *job])
                with torch.device("meta"):
                    model = build_backbone(job_cfg.model)
                for override in job:
                    k, value = override.split("=", 1)
                    if k in GROUPS:  # a group's option (sweep=backbones: model=dit_tiny): that preset's node
                        assert job_cfg[k] == compose([*base, override])[k], (sweep, job)
                    else:
                        assert str(OmegaConf.select(job_cfg, k)) == value, (sweep, job)
                assert sum(p.numel() for p in model.parameters()) > 0, (sweep, job)


# composes every combination (about a minute; shares compose_all's cache with the golden-file test in this file)
def test_every_option_composes_and_resolves():
    assert set(TRAIN_GROUPS) == set(GROUPS), "a new group: add it to resolved_configs.TRAIN_GROUPS"
    keys = {key(*run) for run in combinations()}
    for group, option in [(g, o) for g in GROUPS for o in options(g)]:
        run = option_overrides(group, option)
        assert key(*run) in keys
        container = compose_all()[key(*run)]  # every interpolation resolved
        assert container[group if group != "experiment" else "name"] is not None, run
