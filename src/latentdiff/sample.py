"""`run_sampling(cfg)`: `sample.py`'s work. Images by sample index, sharded over processes, resumable.

The output folder (`out`) and its parts are described in `samples_folder.py`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from latentdiff.checkpoint import backbone_weights, load_checkpoint
from latentdiff.data.store import LatentStore
from latentdiff.distributed import device_for, dist_env
from latentdiff.errors import ConfigError, user_errors
from latentdiff.files import write_json
from latentdiff.models.build import build_backbone
from latentdiff.models.weights import check_fits
from latentdiff.objectives.masked_tokens import check_token_run
from latentdiff.samplers.cfg import null_condition
from latentdiff.samplers.conditions import PromptSet, check_labels, conditions_for
from latentdiff.samplers.fit import check_sampler_fits
from latentdiff.samplers.image import ImageSampler
from latentdiff.samples_folder import assemble, check_out, done_indices, write_part, write_pngs
from latentdiff.trust import STORED_GROUPS, build, check_stored
from latentdiff.utils import framework_versions
from latentdiff.validation import check_config, check_targets, check_values, plain

log = logging.getLogger(__name__)

RUN_GROUPS = ("model", "vae", "diffusion", "data", "module", "sampler")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------- config
def run_config(cfg: DictConfig, overrides: list[str], stored: dict | None) -> DictConfig:
    """The model/vae/diffusion/data/module/sampler config to sample with.

    With a checkpoint, its stored (resolved) run config is the base; a group chosen on the command line
    (`sampler=ddim`) replaces that part, a key (`sampler.steps=25`, `vae.pretrained=<dir>`) replaces that value.
    Without one, the composed sample config is used as it is.
    """
    if stored is None:
        run = OmegaConf.create({g: OmegaConf.to_container(cfg[g], resolve=True) for g in RUN_GROUPS})
    else:
        check_stored(stored, f"ckpt={cfg.ckpt}")  # before OmegaConf sees it: no code, no interpolation
        run = OmegaConf.create({g: stored.get(g) for g in RUN_GROUPS})
        if run.model is not None:
            run.model.pretrained = None  # the checkpoint holds the weights
        given = [o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o and not o.startswith("hydra")]
        choices = [k for k in given if k in RUN_GROUPS]
        keys = [k for k in given if "." in k and k.split(".")[0] in RUN_GROUPS]
        for group in choices:
            run[group] = OmegaConf.to_container(cfg[group], resolve=True)
        for key in keys:
            OmegaConf.update(run, key, OmegaConf.select(cfg, key), merge=False, force_add=True)
    if cfg.get("guidance_scale") is not None:
        run.sampler.guidance_scale = float(cfg.guidance_scale)
    return run


def _validate(cfg: DictConfig, run: DictConfig) -> None:
    """The run config (the checkpoint's, with the command line's changes): values, objects, and its image size."""
    values = plain(run)
    check_values(values)
    # the built groups only (their targets are allowed, `trust.check_stored`): inspecting a target imports its
    # module, and a checkpoint's data/module targets are read, never imported
    check_targets({g: values[g] for g in STORED_GROUPS if STORED_GROUPS[g] and values.get(g) is not None})
    check_sampler_fits(run, sampler_key="sampler.scheduler")
    data, vae = run.get("data") or {}, run.get("vae") or {}
    size, grid, factor = data.get("image_size"), data.get("latent_size"), vae.get("downsample_factor")
    if all(isinstance(v, int) for v in (size, grid, factor)) and size != grid * factor:
        made = grid * factor
        raise ConfigError(
            f"data.image_size={size} does not match the model's {grid}x{grid} latent grid x {factor} = {made}px "
            f"(data.latent_size, vae.downsample_factor); the backbone samples {made}px images: drop "
            "data.image_size, or train a model at that size"
        )
    out = cfg.get("out")
    if out and Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"out={out} is a file; out takes a folder (new, or one holding these samples)")


# -------------------------------------------------------------------------------------------- model
def _build(cfg: DictConfig, run: DictConfig, ckpt: dict | None, device: torch.device) -> dict[str, Any]:
    """Backbone with its weights, autoencoder, objective, conditions; and the provenance of the weights."""
    where = f"ckpt={cfg.ckpt}" if ckpt is not None else "the sample config"
    backbone = build_backbone(run.model, where)
    model_name = f"model={run.model._target_.rsplit('.', 1)[-1]} of this config"
    if ckpt is not None:
        weights, kind = backbone_weights(ckpt["state_dict"], bool(cfg.use_ema), f"ckpt={cfg.ckpt}")
        check_fits(backbone, weights, "ckpt", cfg.ckpt, model_name)
        backbone.load_state_dict(weights)
        source = {
            "checkpoint": str(Path(cfg.ckpt).resolve()),
            "checkpoint_bytes": Path(cfg.ckpt).stat().st_size,
            "global_step": ckpt.get("global_step"),
            "weights": kind,
        }
    else:
        if not run.model.get("pretrained"):
            raise ConfigError(
                "nothing to sample: set ckpt=<run>/last.ckpt, or model=<preset> model.pretrained=<weights file>"
            )
        source = {"checkpoint": str(Path(run.model.pretrained).resolve()), "weights": "pretrained"}
    backbone.eval().requires_grad_(False).to(device)
    autoencoder = build(plain(run.vae), where, "vae").to(device)
    objective = build(plain(run.diffusion), where, "diffusion")
    num_classes = int(run.module.num_classes)
    prompts, null_text = None, None
    if run.data.get("text"):
        store_path = cfg.prompts
        if store_path in ("val", "train"):
            store_path = run.data.get("val_root") if store_path == "val" and run.data.get("val_root") else run.data.root
        store = LatentStore(store_path, key="prompts")
        backbone.check_text_features(store.meta.get("text"), f"prompts={store_path}")
        prompts = PromptSet(store)
        null_text = torch.from_numpy(store.empty_text).float().to(device)  # (L, D)
        source["prompts"] = {"store": str(Path(store_path).resolve()), "captions": len(prompts)}
    elif num_classes > 0:
        check_labels(OmegaConf.to_container(cfg.labels) if OmegaConf.is_config(cfg.labels) else cfg.labels, num_classes)
    check_token_run(backbone, autoencoder, objective)
    sampler = ImageSampler(
        backbone,
        autoencoder,
        objective.scheduler,
        build(plain(run.sampler.scheduler), where, "sampler.scheduler"),
        run.sampler.steps,
        (run.data.latent_channels, run.data.latent_size, run.data.latent_size),
        lambda c: null_condition(c, num_classes, null_text),
        guidance_scale=run.sampler.guidance_scale,
        guidance_interval=run.sampler.get("guidance_interval"),
        step_kwargs=OmegaConf.to_container(run.sampler.get("step_kwargs") or OmegaConf.create({})),
        seed=cfg.seed,
    )
    return {"sampler": sampler, "num_classes": num_classes, "prompts": prompts, "source": source}


def _spec(cfg: DictConfig, run: DictConfig, built: dict[str, Any]) -> dict[str, Any]:
    """samples.json: what produced the images (identity keys) and bookkeeping (`NOT_IDENTITY`)."""
    sampler = run.sampler
    labels = cfg.labels
    return {
        **built["source"],
        "model": OmegaConf.to_container(run.model),
        "vae": built["sampler"].autoencoder.describe(),
        "diffusion": OmegaConf.to_container(run.diffusion),
        "sampler": {
            "scheduler": OmegaConf.to_container(sampler.scheduler),
            "steps": int(sampler.steps),
            "guidance_scale": float(sampler.guidance_scale),
            "guidance_interval": OmegaConf.to_container(sampler.guidance_interval)
            if OmegaConf.is_config(sampler.get("guidance_interval"))
            else sampler.get("guidance_interval"),
            "step_kwargs": OmegaConf.to_container(sampler.get("step_kwargs") or OmegaConf.create({})),
        },
        "seed": int(cfg.seed),
        "labels": (OmegaConf.to_container(labels) if OmegaConf.is_config(labels) else labels)
        if built["num_classes"] > 0 and built["prompts"] is None
        else None,
        "image_size": int(run.data.image_size),
        "precision": str(cfg.precision),
        "num_samples": int(cfg.num_samples),
        "batch_size": int(cfg.batch_size),
        "versions": framework_versions(),
        "complete": False,
    }


def _default_out(cfg: DictConfig, run: DictConfig) -> Path:
    sampler = run.sampler.scheduler._target_.split(".")[-2].replace("Scheduler", "").lower()
    tag = f"{sampler}{run.sampler.steps}-w{float(run.sampler.guidance_scale):g}-seed{cfg.seed}"
    if cfg.ckpt:
        weights = "ema" if cfg.use_ema else "raw"
        return Path(cfg.ckpt).resolve().parent / "samples" / f"{Path(cfg.ckpt).stem}-{weights}-{tag}"
    return Path.cwd() / "outputs" / "samples" / f"{Path(run.model.pretrained).stem}-{tag}"


# -------------------------------------------------------------------------------------------- run
def _num_processes(devices: Any) -> int:
    if str(devices) == "auto":
        return max(1, torch.cuda.device_count())
    return int(devices)


def _spawned(local_rank: int, world: int, cfg: dict, overrides: list[str]) -> None:
    """One of `devices=N` processes: the environment torchrun would set, then the same `run_sampling`."""
    import sys

    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    if not torch.cuda.is_available():  # CPU processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        run_sampling(OmegaConf.create(cfg), overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def _spawn(cfg: DictConfig, run: DictConfig, overrides: list[str], nprocs: int) -> dict[str, Any]:
    import torch.multiprocessing as mp

    container = OmegaConf.to_container(cfg, resolve=True)
    container["out"] = str(Path(cfg.out) if cfg.get("out") else _default_out(cfg, run))  # one folder for all
    container["devices"] = 1
    try:
        mp.spawn(_spawned, args=(nprocs, container, overrides), nprocs=nprocs, join=True)
    except mp.ProcessExitedException as err:
        raise SystemExit(err.exit_code or 1) from None  # the process printed its error
    result = json.loads((Path(container["out"]) / "samples.json").read_text())
    result["out"] = container["out"]
    return result


def run_sampling(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """Generate `cfg.num_samples` images into `cfg.out` (see the module docstring and conf/sample.yaml).

    Args:
        cfg: the composed `conf/sample.yaml`.
        overrides: the command-line overrides (`key=value`), which decide what replaces the checkpoint's config.

    Returns:
        samples.json's content (with `npz` when this process wrote samples.npz).
    """
    overrides = list(overrides or [])
    rank, world, local_rank = dist_env()
    with user_errors():
        check_config(cfg, "sample", groups=False)
        ckpt = load_checkpoint(cfg.ckpt, "ckpt") if cfg.get("ckpt") else None
        stored = ckpt["latentdiff"].get("config") if ckpt is not None else None
        if ckpt is not None and not stored:
            raise ConfigError(
                f"ckpt={cfg.ckpt} holds no run config to sample with; it was not written by a training run"
            )
        run = run_config(cfg, overrides, stored)
        _validate(cfg, run)
        nprocs = _num_processes(cfg.devices)
        if world == 1 and nprocs > 1:  # one process per device on this machine
            return _spawn(cfg, run, overrides, nprocs)
        device = device_for("auto", local_rank)
        built = _build(cfg, run, ckpt, device)
        spec = _spec(cfg, run, built)
        out = Path(cfg.out) if cfg.get("out") else _default_out(cfg, run)
        if rank != 0:  # rank 0 checks the folder and writes samples.json first
            _wait_for(out / "samples.json")
        check_out(out, spec)
    del ckpt
    n = int(cfg.num_samples)
    previous = json.loads((out / "samples.json").read_text()) if (out / "samples.json").is_file() else {}
    if previous.get("complete") and previous.get("num_samples") == n and (out / "samples.npz").is_file():
        log.info("%s already holds the %d samples asked for; nothing to do", out / "samples.npz", n)
        return {**previous, "out": str(out), "npz": str(out / "samples.npz")}
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        write_json(out / "samples.json", spec)
    for folder in (out / "parts", *((out / "images",) if cfg.save_png else ())):
        folder.mkdir(parents=True, exist_ok=True)
    done = done_indices(out)
    todo = [i for i in range(n) if i % world == rank and i not in done]
    log.info("rank %d/%d: %d of %d samples to make on %s (%s)", rank, world, len(todo), n, device, out)
    sampler, prompts = built["sampler"], built["prompts"]
    autocast = PRECISIONS[str(cfg.precision)]
    start = time.perf_counter()
    with tqdm(total=len(todo), desc=f"sample rank {rank}", unit="img", disable=rank != 0 or None) as bar:
        for b in range(0, len(todo), int(cfg.batch_size)):
            indices = todo[b : b + int(cfg.batch_size)]
            cond, record = conditions_for(indices, built["num_classes"], int(cfg.seed), _labels(cfg), prompts)
            context = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
            with context:  # the backbone; the VAE decodes in float32
                latents = sampler.latents(indices, cond)
            images = sampler.decode(latents).numpy()  # (B, H, W, 3) uint8
            if cfg.save_png:
                write_pngs(out, indices, images)
            write_part(out, rank, indices, images, record)
            bar.update(len(indices))
    seconds = time.perf_counter() - start
    result = dict(spec)
    npz = assemble(out, n, class_conditional=built["num_classes"] > 0 and prompts is None)
    if npz is not None:
        result.update(complete=True)
        write_json(out / "samples.json", result)
        result["npz"] = str(npz)
        rate = len(todo) / seconds if todo and seconds > 0 else 0.0
        log.info("%s: %d samples (%d made by this process, %.2f img/s)", npz, n, len(todo), rate)
    else:
        log.info("rank %d done (%d samples); the last process to finish writes samples.npz", rank, len(todo))
    result["out"] = str(out)
    return result


def _wait_for(path: Path, timeout: float = 3600.0) -> None:
    """Wait until another process has written `path` (rank 0's samples.json); torchrun/spawn stop us on its error."""
    start = time.monotonic()
    while not path.is_file():
        if time.monotonic() - start > timeout:
            raise ConfigError(f"{path} was not written by rank 0 within {timeout:.0f} s")
        time.sleep(0.2)


def _labels(cfg: DictConfig) -> Any:
    return OmegaConf.to_container(cfg.labels) if OmegaConf.is_config(cfg.labels) else cfg.labels
