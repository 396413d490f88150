"""The resolved configs users select, composed from `conf/`: the golden file `tests/data/resolved_configs.json`.

A preset may move its values into a base (`defaults: [uvit, _self_]`) or an experiment may drop a value its
groups already give; what a user gets must not change. `test_configs.py` recomposes every combination below
and compares it key by key with the golden file. After an intended change of a value, regenerate the file:

    PYTHONPATH=src python -m tests.resolved_configs

Values that depend on the machine (the `ld.fast_precision` resolver, the clock, the launch directory) are
kept unresolved, so the file is the same on every machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

from latentdiff.config import register_resolvers

from .conftest import CONF_DIR

GOLDEN = Path(__file__).parent / "data" / "resolved_configs.json"
MACHINE_DEPENDENT = ("${ld.fast_precision:", "${ld.cwd:", "${now:")

# model presets: the data (and autoencoder) each is meant for, besides the default run (the quickstart's)
LATENTS_256 = ["data=imagenet256_latents", "vae=sd_ema"]
LATENTS_512 = ["data=imagenet512_latents", "vae=sd_ema"]
COCO_256 = ["data=coco256_latents", "vae=sd_ema"]
MODEL_DATA: dict[str, list[list[str]]] = {
    "uvit_tiny": [],
    "uvit_s2": [["data=cifar10"]],
    "uvit_s4": [["data=celeba64"]],
    "uvit_m4": [["data=imagenet64"]],
    "uvit_l4": [["data=imagenet64"]],
    "uvit_l2": [LATENTS_256],
    "uvit_h2": [LATENTS_256],
    "uvit_l4_512": [LATENTS_512],
    "uvit_h4_512": [LATENTS_512],
    "uvit_s2_t2i": [COCO_256],
    "uvit_s2_t2i_deep": [COCO_256],
    "unet": [LATENTS_256],
    "unet_tiny": [],
    "unet_cond": [COCO_256],
    "unet_cond_tiny": [["data.num_classes=0"]],
    "uvit2d": [["data=latents", "data.num_classes=1000", "vae=vq_amused256", "diffusion=masked_tokens"]],
    "uvit2d_tiny": [["experiment=quickstart_tokens"]],
}
# sweep presets: the experiment their header runs them on
SWEEP_BASE = {"tiny": []}
ENTRIES: dict[str, list[list[str]]] = {
    "sample": [[], ["model=uvit_l2"], ["model=uvit_s2_t2i", "data=coco256_latents"]],
    "extract": [["out=/x"], ["out=/x", "data=coco_captions", "text_encoder=clip_vit_l14"]],
    "evaluate": [["samples=/x"]],
    "export": [["ckpt=/x", "out=/y"]],
}


def combinations() -> list[tuple[str, list[str]]]:
    """(config name, overrides) of every combination in the golden file."""
    options = lambda group: sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))  # noqa: E731
    assert sorted(MODEL_DATA) == options("model"), "a new model preset: add the data it is meant for"
    runs: list[tuple[str, list[str]]] = [("train", [])]
    for model, datas in MODEL_DATA.items():
        runs += [("train", [*data, f"model={model}"]) for data in [[], *datas]]
    runs += [("train", [f"experiment={name}"]) for name in options("experiment")]
    for sweep in options("sweep"):
        runs.append(("train", [*SWEEP_BASE.get(sweep, ["experiment=cifar10_uvit_s2"]), f"sweep={sweep}"]))
    runs += [(entry, overrides) for entry, variants in ENTRIES.items() for overrides in variants]
    return runs


def key(config_name: str, overrides: list[str]) -> str:
    """The golden file's key of one combination: `train model=uvit_l2 data=...`."""
    return " ".join([config_name, *overrides])


# the run directory decided by Hydra at launch (paths.output_dir reads it), fixed here
FIXED_PATHS = ["paths.root_dir=/run-root", "paths.output_dir=/run-root/run"]


def _machine_free(resolved: Any, raw: Any) -> Any:
    """`resolved` with the values whose raw form reads the machine (see MACHINE_DEPENDENT) left unresolved."""
    if isinstance(resolved, dict) and isinstance(raw, dict):
        return {k: _machine_free(v, raw.get(k)) for k, v in resolved.items()}
    if isinstance(resolved, list) and isinstance(raw, list) and len(raw) == len(resolved):
        return [_machine_free(v, r) for v, r in zip(resolved, raw, strict=True)]
    if isinstance(raw, str) and any(marker in raw for marker in MACHINE_DEPENDENT):
        return raw
    return resolved


def _resolve(config_name: str, overrides: list[str]) -> dict:
    """One combination, resolved, without Hydra's keys (but a sweep's mode and sweeper); in a Hydra context."""
    train = config_name == "train"
    sweep = train and any(o.startswith("sweep=") for o in overrides)
    cfg = compose(config_name, [*overrides, *(FIXED_PATHS if train else [])], return_hydra_config=sweep)
    hydra = cfg.hydra if sweep else None
    with open_dict(cfg):
        cfg.pop("hydra", None)
    resolved = _machine_free(OmegaConf.to_container(cfg, resolve=True), OmegaConf.to_container(cfg))
    if hydra is not None:
        resolved["hydra"] = {"mode": str(hydra.mode), "sweeper": OmegaConf.to_container(hydra.sweeper, resolve=True)}
    return resolved


def compose_all() -> dict[str, dict]:
    """Every combination, resolved: {key: config} (one Hydra context for all: ~0.1 s a config)."""
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return {key(name, overrides): _resolve(name, overrides) for name, overrides in combinations()}
    finally:
        GlobalHydra.instance().clear()


if __name__ == "__main__":
    configs = compose_all()
    GOLDEN.write_text(json.dumps(configs, indent=1, sort_keys=False) + "\n")
    print(f"{GOLDEN}: {len(configs)} configs, {GOLDEN.stat().st_size / 1e3:.0f} kB")
