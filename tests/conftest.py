"""Shared by every tier: compose the real config tree (no subprocess), tiny overrides, a tmp run directory."""

from __future__ import annotations

import os
from pathlib import Path

# diffusers copies an export's trust_remote_code files here (read when diffusers is first imported): inside the
# checkout, not the user's ~/.cache (tests/e2e/test_reliability.py, tests/integration/test_export_pipelines.py)
os.environ.setdefault("HF_MODULES_CACHE", str(Path(__file__).resolve().parents[1] / "outputs" / "test-cache" / "hf"))

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from latentdiff.config import register_resolvers

ROOT = Path(__file__).resolve().parents[1]  # the repository
# the shapes judge (latentdiff.judge) is trained once for the tests of this checkout and shared by the workers
os.environ.setdefault("LATENTDIFF_CACHE", str(ROOT / "outputs" / "test-cache"))

# Threads of torch in a test and in the subprocesses it starts: 2 (tests/data/legacy was computed so, within its
# tolerances), or a pytest-xdist worker's share of the cores (`make test` runs one worker per core).
THREADS = 2
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    THREADS = max(1, min(2, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
CONF_DIR = ROOT / "conf"

# A run small enough for a unit test on 2 CPU cores. It keeps a Gaussian objective and sampler (the quickstart
# trains rectified flow), so the tests cover the DDPM-scheduler path; flow has its own tests. Its group choices
# beat an experiment's `override /...`: `[*TINY_RUN, "experiment=X"]` needs X's objective and sampler named again.
TINY_RUN = [
    "model=uvit_tiny",
    "diffusion=cosine_v",
    "sampler=dpm_solver",
    "sampler.guidance_scale=2.0",
    "trainer.precision=32-true",
    "data.num_train=256",
    "data.num_val=64",
    "data.batch_size=16",
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "sampler.steps=2",
    "callbacks.sample_grid.every_n_steps=0",
    "callbacks.sample_grid.samples_per_class=2",
    "callbacks.progress_bar=null",
]


def compose_config(overrides: list[str] | None = None, output_dir: Path | None = None) -> DictConfig:
    """Compose `conf/train.yaml` as `train.py` would, with `paths.*` pointing into `output_dir`."""
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides or []))
    with open_dict(cfg):
        root = Path(output_dir) if output_dir is not None else Path("/nonexistent-run-dir")
        cfg.paths.root_dir = str(root)
        cfg.paths.log_dir = str(root / "outputs")
        cfg.paths.data_dir = str(root / "data")
        cfg.paths.output_dir = str(root / "run")
    return cfg


def compose_entry(name: str, overrides: list[str]):
    """An entry config (conf/<name>.yaml: extract, sample) composed as its script composes it."""
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def compose_extract(overrides: list[str]):
    return compose_entry("extract", overrides)


@pytest.fixture
def compose_cfg(tmp_path):
    """compose_cfg(overrides) -> DictConfig of conf/train.yaml, run directory under tmp_path."""

    def _compose(overrides: list[str] | None = None) -> DictConfig:
        return compose_config(overrides, tmp_path)

    return _compose


def default_timeout(items: list[pytest.Item], folder: Path, seconds: int) -> None:
    """Give each test under `folder` pytest-timeout's `timeout(seconds)` unless it (or its module) has its own.

    Each tier's conftest.py calls this from `pytest_collection_modifyitems` with its own limit; the limit covers
    the test's fixtures too (a module-scoped fixture counts against the first test that uses it).
    """
    for item in items:
        if item.path.is_relative_to(folder) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(seconds))


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(THREADS)
    yield
