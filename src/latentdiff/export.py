"""`python -m latentdiff.export ckpt=<run>/last.ckpt out=<dir>`: a checkpoint's backbone as a folder that latentdiff
and diffusers load.

    out/
      latentdiff.json             the run: its config (model, vae, diffusion, sampler, data, module), the step, which
                                  weights (EMA or raw), the versions
      backbone.safetensors        the backbone's weights in one file; its metadata holds the model config
      model_index.json            the diffusers pipeline (`export_pipeline`): `DiTPipeline`, or `LatentdiffPipeline`
      pipeline_latentdiff.py        with the one-line file that imports it; none for text and VQ-token runs
      unet/ | transformer/        the backbone as a diffusers model: `UNet2DModel`, `UNet2DConditionModel`,
                                  `UVit2DModel`, `DiTTransformer2DModel` (DiTPipeline), else `LatentdiffBackbone`
      vae/                        the run's `AutoencoderKL`, its `scaling_factor` the run's (latent runs)
      scheduler/                  the training noise schedule (`DiTPipeline`: the run's sampler)

    DiffusionPipeline.from_pretrained(out, trust_remote_code=True)(class_labels=[1, 2], seed=0).images

`model.pretrained=out/backbone.safetensors` or `model.pretrained=out` loads the weights into a run, a sample
job or `load_exported(out)`; every way gives the outputs of the checkpoint's weights exactly, and none runs a file
of the folder.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from safetensors.torch import save_file
from torch import nn

from latentdiff.checkpoint import backbone_weights, load_checkpoint
from latentdiff.errors import ConfigError, user_errors
from latentdiff.export_pipeline import write_pipeline
from latentdiff.models.build import build_backbone
from latentdiff.models.contract import Backbone
from latentdiff.models.weights import EXPORT_RECORD, load_pretrained
from latentdiff.trust import check_stored
from latentdiff.utils import framework_versions
from latentdiff.validation import check_config

log = logging.getLogger(__name__)

RECORD = EXPORT_RECORD  # the run an export folder holds (model_index.json is the diffusers pipeline's)


def checkpoint_backbone(ckpt: dict[str, Any], use_ema: bool = True, where: str = "ckpt") -> tuple[nn.Module, dict, str]:
    """The backbone of a training checkpoint with its weights; its model config; "ema" or "raw"."""
    config = ckpt["latentdiff"]["config"]
    check_stored(config, where)  # the whole stored config is copied into the export: nothing in it names code
    if not isinstance(config.get("model"), dict):
        raise ConfigError(f"{where}: the stored config has no model; it is not a latentdiff training checkpoint")
    model_cfg = dict(config["model"], pretrained=None)
    backbone = build_backbone(model_cfg, where)
    weights, kind = backbone_weights(ckpt["state_dict"], use_ema)
    backbone.load_state_dict(weights)
    return backbone.eval(), model_cfg, kind


def export(ckpt_path: str | Path, out: str | Path, use_ema: bool = True) -> dict[str, Any]:
    """Write the export folder (see the module docstring) into a new or empty `out`.

    Returns:
        The `latentdiff.json` record (the run: source, step, weights, config, versions).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"out={out} exists and is not empty; choose a new folder")
    ckpt = load_checkpoint(ckpt_path, "ckpt")
    where = f"ckpt={ckpt_path}"
    backbone, model_cfg, weights = checkpoint_backbone(ckpt, use_ema, where)
    config = ckpt["latentdiff"]["config"]
    record = {
        "source": str(Path(ckpt_path).resolve()),
        "step": int(ckpt.get("global_step", 0)),
        "weights": weights,
        "config": {k: config.get(k) for k in ("model", "vae", "diffusion", "sampler", "data", "module")},
        "versions": framework_versions(),
    }
    record["config"]["model"] = model_cfg
    tmp = out.with_name(f".{out.name}.tmp-export")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        _write(tmp, backbone, record, where)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left behind
        raise
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    log.info("exported %s weights of %s (step %d) to %s", weights, ckpt_path, record["step"], out)
    return record


def _write(tmp: Path, backbone: Backbone, record: dict, where: str) -> None:
    """The export folder's files, into `tmp`."""
    model_cfg = record["config"]["model"]
    state = {k: v.detach().contiguous() for k, v in backbone.state_dict().items()}
    save_file(state, str(tmp / "backbone.safetensors"), metadata={"latentdiff_model": json.dumps(model_cfg)})
    write_pipeline(tmp, backbone, model_cfg, record["config"], where)
    (tmp / RECORD).write_text(json.dumps(record, indent=2))


def load_exported(path: str | Path) -> nn.Module:
    """The backbone of an export folder or `backbone.safetensors`, built from the config stored with it."""
    path = Path(path)
    if path.is_dir():
        where, read = export_record(path)
        if read is None:
            raise ConfigError(f"{path} holds no {RECORD}; export a checkpoint with `python -m latentdiff.export`")
        model_cfg = _stored_model(lambda: read()["config"]["model"], where)
    else:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "latentdiff_model" not in meta:
            raise ConfigError(
                f"{path} has no latentdiff model config in its metadata; build the model and use model.pretrained"
            )
        where = f"{path} (metadata)"
        model_cfg = _stored_model(lambda: json.loads(meta["latentdiff_model"]), where)
    backbone = build_backbone(dict(model_cfg, pretrained=None), where)
    load_pretrained(backbone, path)
    return backbone.eval()


def export_record(folder: Path) -> tuple[str, Any]:
    """Where an export folder's run record is and a function reading it (None: not an export): `latentdiff.json`,
    or the `_latentdiff` entry of `model_index.json` in exports written before it."""
    if (folder / RECORD).is_file():
        return f"{folder}/{RECORD}", lambda: json.loads((folder / RECORD).read_text())
    index = folder / "model_index.json"
    try:
        old = index.is_file() and "_latentdiff" in json.loads(index.read_text())
    except ValueError:
        old = False
    if old:
        return f"{index}", lambda: json.loads(index.read_text())["_latentdiff"]
    return f"{folder}/{RECORD}", None


def _stored_model(read: Any, where: str) -> dict:
    """The model config of an export, read by `read()`; a file that holds none is a one-line error."""
    try:
        model_cfg = read()
    except (KeyError, TypeError, ValueError):
        model_cfg = None
    if not isinstance(model_cfg, dict):
        raise ConfigError(
            f"{where} holds no latentdiff model config; export a checkpoint with `python -m latentdiff.export`"
        )
    return model_cfg


def run_export(cfg: DictConfig) -> dict[str, Any]:
    with user_errors():
        check_config(cfg, "export", groups=False)
        if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
            raise ConfigError(f"out={cfg.out} is a file; out takes a new folder")
        return export(cfg.ckpt, cfg.out, bool(cfg.use_ema))


def main() -> None:
    from latentdiff.cli import CONF_DIR, hydra_entry

    hydra_entry(run_export, CONF_DIR, "export", cleanup_run_dir=False)


if __name__ == "__main__":
    main()
