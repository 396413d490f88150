"""The resolved configs users select, composed from `conf/`: the golden file `tests/data/resolved_configs.json`.

A preset may move its values into a base (`defaults: [uvit, _self_]`) or an experiment may drop a value its
groups already give; what a user gets must not change. `test_configs.py` recomposes every combination below
and compares it key by key with the golden file; the compose tests read the same recomposed configs. After an
intended change of a value, regenerate the file (and read its diff):

    PYTHONPATH=src python -m tests.resolved_configs

Values that depend on the machine (the `ld.fast_precision` resolver, the clock, the launch directory) are
kept unresolved, so the file is the same on every machine.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

from latentdiff.config import register_resolvers
from latentdiff.renames import canonical_target

from .conftest import CONF_DIR

GOLDEN = Path(__file__).parent / "data" / "resolved_configs.json"
MACHINE_DEPENDENT = ("${ld.fast_precision:", "${ld.cwd:", "${now:")
# the run directory Hydra decides at launch (paths.output_dir reads it), fixed here
FIXED_PATHS = ["paths.root_dir=/run-root", "paths.output_dir=/run-root/run"]

# groups of conf/train.yaml (text_encoder belongs to conf/extract.yaml; sweep presets: SWEEP_BASE)
TRAIN_GROUPS = ("callbacks", "data", "diffusion", "experiment", "logger", "model", "module", "optim")
TRAIN_GROUPS += ("sampler", "trainer", "vae")
EXTRACTION_SOURCES = ("imagenet_folder", "coco_captions")  # data options of conf/extract.yaml
TOKEN_PIECES = ("uvit2d", "uvit2d_tiny", "masked_tokens", "amused")  # they compose with experiment=quickstart_tokens
# model presets: the data (and autoencoder) each is meant for, besides the default run (the quickstart's)
LATENTS_256 = ["data=imagenet256_latents", "vae=sd_ema"]
LATENTS_512 = ["data=imagenet512_latents", "vae=sd_ema"]
COCO_256 = ["data=coco256_latents", "vae=sd_ema"]
MODEL_DATA: dict[str, list[str]] = {
    "uvit_s2": ["data=cifar10"],
    "uvit_s4": ["data=celeba64"],
    "uvit_m4": ["data=imagenet64"],
    "uvit_l4": ["data=imagenet64"],
    "uvit_l2": LATENTS_256,
    "uvit_h2": LATENTS_256,
    "uvit_l4_512": LATENTS_512,
    "uvit_h4_512": LATENTS_512,
    "uvit_s2_t2i": COCO_256,
    "uvit_s2_t2i_deep": COCO_256,
    "unet": LATENTS_256,
    "unet_cond": COCO_256,
    "uvit2d": ["data=latents", "data.num_classes=1000", "vae=vq_amused256", "diffusion=masked_tokens"],
    **{f"dit_{size}{patch}": LATENTS_256 for size in ("s", "b", "l", "xl") for patch in (2, 4, 8)},
    "sit_xl2": [*LATENTS_256, "diffusion=flow"],
    "lightningdit_b1": LATENTS_256,
    "lightningdit_xl1": LATENTS_256,
}
DEFAULT_DATA_MODELS = (
    "uvit",
    "uvit_tiny",
    "unet_tiny",
    "unet_mini",
    "unet_cond_tiny",
    "uvit2d_tiny",
    "dit",
    "dit_tiny",
)  # the quickstart's data fits
SWEEP_BASE = {"tiny": [], "backbones": []}  # the runs a sweep preset's header starts; else experiment=cifar10_uvit_s2
ENTRIES: dict[str, list[list[str]]] = {
    "sample": [[], ["model=uvit_l2"], ["model=uvit_s2_t2i", "data=coco256_latents"]],
    "extract": [["out=/x"], *(["data=coco_captions", f"text_encoder={t}", "out=/x", "resolution=512"]
                              for t in ("clip_vit_l14", "local", "amused"))],
    "evaluate": [["samples=/x"]],
    "export": [["ckpt=/x", "out=/y"]],
}  # fmt: skip


def options(group: str) -> list[str]:
    """The options of a config group: the file names of `conf/<group>/`."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def option_overrides(group: str, option: str) -> tuple[str, list[str]]:
    """(config name, overrides) that select `group=option` with what it needs to compose."""
    overrides = [f"{group}={option}"]
    if (group, option) == ("vae", "local"):
        overrides.append("vae.pretrained=/some/dir")
    if group == "data" and option.endswith("_latents"):
        overrides += ["vae=sd_ema", "model=uvit_s2_t2i" if "coco" in option else "model=uvit_l2"]
    if group == "vae" and option != "none":
        overrides += ["model=uvit_tiny", "model.patch_size=2"]  # 256 px / 8 = 32 latents need image_size 256
        overrides.append("data.image_size=256")
    if group == "data" and option in EXTRACTION_SOURCES:
        return "extract", [*overrides, "out=/x"]  # a source composes with conf/extract.yaml
    return "train", overrides


def object_overrides(group: str, option: str) -> list[str]:
    """Train overrides under which a model, diffusion or sampler option instantiates (its partners chosen)."""
    if option in TOKEN_PIECES:  # the masked-token pieces go together
        return ["experiment=quickstart_tokens", f"{group}={option}"]
    if group == "model" and ("t2i" in option or option.startswith("unet_cond")):  # text models: no class ids
        return [f"{group}={option}", "data.num_classes=0"]
    if group == "sampler" and option.startswith("flow"):
        return [f"{group}={option}", "diffusion=flow"]
    if group == "sampler" and option == "ddpm_learned":  # reads a learned variance: DiT's sampler
        return [f"{group}={option}", "diffusion=linear", "model=dit_tiny", "model.learn_sigma=true"]
    if group == "sampler":  # the default objective is flow: a Gaussian sampler needs a Gaussian objective
        return [f"{group}={option}", "diffusion=cosine_v"]
    if group == "diffusion" and not option.startswith("flow"):  # and the reverse
        return [f"{group}={option}", "sampler=dpm_solver"]
    return [f"{group}={option}"]


def sweep_base(sweep: str) -> list[str]:
    """The overrides of a sweep preset's base run."""
    return [*SWEEP_BASE.get(sweep, ["experiment=cifar10_uvit_s2"]), f"sweep={sweep}"]


def combinations() -> list[tuple[str, list[str]]]:
    """(config name, overrides) of every combination in the golden file, without repeats."""
    missing = set(options("model")) - set(MODEL_DATA) - set(DEFAULT_DATA_MODELS)
    assert not missing, f"new model presets {sorted(missing)}: add the data each is meant for to MODEL_DATA"
    runs = [("train", [])]
    runs += [option_overrides(group, option) for group in TRAIN_GROUPS for option in options(group)]
    runs += [("train", [*data, f"model={model}"]) for model, data in MODEL_DATA.items()]
    runs += [("train", object_overrides(g, o)) for g in ("model", "diffusion", "sampler") for o in options(g)]
    runs += [("train", sweep_base(sweep)) for sweep in options("sweep")]
    runs += [(entry, overrides) for entry, variants in ENTRIES.items() for overrides in variants]
    return list({key(*run): run for run in runs}.values())


def key(config_name: str, overrides: list[str]) -> str:
    """The golden file's key of one combination: `train model=uvit_l2 data=...`."""
    return " ".join([config_name, *overrides])


@contextmanager
def composer() -> Iterator[Callable[..., DictConfig]]:
    """compose(overrides, config_name="train", hydra=False): many configs in one Hydra context.

    A train config gets FIXED_PATHS; `hydra=True` keeps Hydra's own keys (a sweep's sweeper).
    """
    register_resolvers()
    GlobalHydra.instance().clear()

    def _compose(overrides: list[str], config_name: str = "train", hydra: bool = False) -> DictConfig:
        paths = FIXED_PATHS if config_name == "train" else []
        return compose(config_name, [*overrides, *paths], return_hydra_config=hydra)

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            yield _compose
    finally:
        GlobalHydra.instance().clear()


def _machine_free(resolved: Any, raw: Any) -> Any:
    """`resolved` with the values whose raw form reads the machine (see MACHINE_DEPENDENT) left unresolved."""
    if isinstance(resolved, dict) and isinstance(raw, dict):
        return {k: _machine_free(v, raw.get(k)) for k, v in resolved.items()}
    if isinstance(resolved, list) and isinstance(raw, list) and len(raw) == len(resolved):
        return [_machine_free(v, r) for v, r in zip(resolved, raw, strict=True)]
    if isinstance(raw, str) and any(marker in raw for marker in MACHINE_DEPENDENT):
        return raw
    return resolved


def _resolve(compose_fn: Callable[..., DictConfig], config_name: str, overrides: list[str]) -> dict:
    """One combination, resolved, without Hydra's keys but a sweep's mode and sweeper."""
    sweep = config_name == "train" and any(o.startswith("sweep=") for o in overrides)
    cfg = compose_fn(overrides, config_name, hydra=sweep)
    hydra = cfg.hydra if sweep else None
    with open_dict(cfg):
        cfg.pop("hydra", None)
    resolved = _machine_free(OmegaConf.to_container(cfg, resolve=True), OmegaConf.to_container(cfg))
    if hydra is not None:
        resolved["hydra"] = {"mode": str(hydra.mode), "sweeper": OmegaConf.to_container(hydra.sweeper, resolve=True)}
    return resolved


_RESOLVED: dict[str, dict] = {}  # composed once per test session


def compose_all() -> dict[str, dict]:
    """Every combination, resolved: {key: config} (do not mutate)."""
    runs = [run for run in combinations() if key(*run) not in _RESOLVED]
    if runs:
        with composer() as compose_fn:
            _RESOLVED.update({key(name, overrides): _resolve(compose_fn, name, overrides) for name, overrides in runs})
    return {key(*run): _RESOLVED[key(*run)] for run in combinations()}


def resolved(config_name: str, overrides: list[str]) -> DictConfig:
    """One combination of the golden file, composed and resolved (a fresh copy)."""
    k = key(config_name, overrides)
    assert k in {key(*run) for run in combinations()}, f"{k} is not a combination of the golden file"
    if k not in _RESOLVED:
        with composer() as compose_fn:
            _RESOLVED[k] = _resolve(compose_fn, config_name, overrides)
    return OmegaConf.create(_RESOLVED[k])


if __name__ == "__main__":
    configs = compose_all()
    GOLDEN.write_text(json.dumps(configs, indent=1) + "\n")
    print(f"{GOLDEN}: {len(configs)} configs, {GOLDEN.stat().st_size / 1e3:.0f} kB")


def first_difference(golden: object, composed: object, path: str = "") -> str | None:
    """The first key path where `composed` differs from `golden` (`_target_` values compared canonically)."""
    if isinstance(golden, dict) and isinstance(composed, dict):
        for k in [*golden, *(k for k in composed if k not in golden)]:
            where = f"{path}.{k}" if path else str(k)
            if k not in composed or k not in golden:
                side = "composed" if k not in composed else "golden file"
                return f"{where}: missing from the {side}"
            if k == "_target_" and isinstance(golden[k], str) and isinstance(composed[k], str):
                if canonical_target(golden[k]) != canonical_target(composed[k]):
                    return f"{where}: golden {golden[k]!r}, composed {composed[k]!r}"
                continue
            difference = first_difference(golden[k], composed[k], where)
            if difference is not None:
                return difference
        return None
    if isinstance(golden, list) and isinstance(composed, list) and len(golden) == len(composed):
        for i, (g, c) in enumerate(zip(golden, composed, strict=True)):
            difference = first_difference(g, c, f"{path}[{i}]")
            if difference is not None:
                return difference
        return None
    if golden != composed or type(golden) is not type(composed):
        return f"{path}: golden {golden!r}, composed {composed!r}"
    return None
