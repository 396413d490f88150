"""Encode an image source once into a latent store: `python -m latentdiff.extract data=... out=...`.

With a VQ tokenizer (`vae=vq_amused256`, `vq_local`, `vq_tiny`) the store holds uint16 codebook ids instead of
VAE moments (see `latentdiff.data.store`).

    python -m latentdiff.extract data=imagenet_folder data.root=/data/imagenet/train resolution=256 \
        vae=sd_ema out=/data/in256_latents
    python -m latentdiff.extract data=coco_captions data.images=/data/coco/train2014 \
        data.annotations=/data/coco/annotations/captions_train2014.json text_encoder=clip_vit_l14 out=/data/coco256

Each shard (`shard_size` consecutive source items) is encoded and written atomically; a re-run with the
same arguments skips complete shards (resume), and refuses a folder that holds another extraction. Under
torchrun / SLURM with several processes, shard k goes to rank k mod world size; the last rank to finish
writes `store.json`. See `latentdiff.data.store` for the layout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from latentdiff.data.store import (
    FORMAT,
    VERSION,
    check_shard,
    check_store_records,
    read_store_meta,
    sha256_file,
    shard_name,
    write_shard,
)
from latentdiff.distributed import device_for, dist_env
from latentdiff.errors import ConfigError, StoreError, user_errors
from latentdiff.files import save_array, write_json
from latentdiff.utils import framework_versions
from latentdiff.validation import check_config

log = logging.getLogger(__name__)
_SKIPPED_LISTED = 20  # unreadable files named in store.json (all are in the shards' index.json)


def _items(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """collate_fn: keep the list of source items (images may be None when unreadable)."""
    return batch


def _prepare_out(out: Path, plan: dict[str, Any]) -> bool:
    """Create the store folder or check that it holds this same extraction. Returns True if already complete."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} exists and is not a folder")
    plan_file = out / "plan.json"
    if plan_file.exists():
        old = json.loads(plan_file.read_text())
        diff = []  # the differing keys, one level deep (e.g. source.resolution)
        for key in sorted(set(old) | set(plan)):
            a, b = old.get(key), plan.get(key)
            if isinstance(a, dict) and isinstance(b, dict):
                diff += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            elif a != b:
                diff.append(key)
        if diff:
            raise ConfigError(
                f"out={out} holds another extraction (differs in {', '.join(diff)}); choose a new out= folder"
            )
        return (out / "store.json").exists()
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"out={out} is not empty and is not a latent store; choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    write_json(plan_file, plan)
    return False


def _store_records_hold(out: Path) -> bool:
    """Whether store.json's checksums (of the shard indexes and empty_text.npy) still match the files."""
    try:
        check_store_records(out, read_store_meta(out, "out"))
    except StoreError as err:
        log.warning("%s; finishing the store again", err)
        return False
    return True


def _shard_complete(out: Path, index: int, verify: bool = False) -> bool:
    """Whether shard `index` is on disk, whole (shapes), and with `verify`, unchanged since it was written."""
    path = out / "shards" / shard_name(index)
    if not path.is_dir():
        return False
    try:
        check_shard(path, verify=verify)
    except StoreError as err:
        log.warning("shard %s is damaged (%s); extracting it again", shard_name(index), err)
        return False
    return True


@torch.no_grad()
def _encode_shard(source, items: range, autoencoder, text_encoder, cfg, device, bar) -> tuple[dict, dict]:
    """Encode source items -> (arrays, info) of one shard."""
    loader = DataLoader(
        Subset(source, list(items)),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        collate_fn=_items,
    )
    views = 2 if cfg.flip else 1
    encoded, labels, sources, skipped = [], [], [], []
    text, offsets, captions = [], [0], []
    for batch in loader:
        good = [it for it in batch if it["image"] is not None]
        skipped += [[it["path"], it["error"]] for it in batch if it["image"] is None]
        if good:
            x = torch.from_numpy(np.stack([it["image"] for it in good])).to(device)  # (b, H, W, 3) uint8
            x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (b, 3, H, W) in [-1, 1]
            if views == 2:
                x = torch.cat([x, x.flip(-1)])  # (2b, 3, H, W): images, then their mirror images
            m = autoencoder.encode_for_store(x)  # (Fb, 2C, h, w) VAE moments or (Fb, h, w) VQ codebook ids
            m = m.view(views, len(good), *m.shape[1:]).transpose(0, 1)  # (b, F, 2C, h, w) or (b, F, h, w)
            encoded.append(m.cpu().numpy().astype(autoencoder.store_dtype, copy=False))
            labels += [it["label"] for it in good]
            sources += [it["index"] for it in good]
            if text_encoder is not None:
                caps = [it["captions"] for it in good]
                flat = [c for cs in caps for c in cs]
                for start in range(0, len(flat), cfg.text_batch_size):
                    feats = text_encoder(flat[start : start + cfg.text_batch_size])  # (k, L, D)
                    text.append(feats.to(torch.float16).cpu().numpy())
                offsets += list(offsets[-1] + np.cumsum([len(cs) for cs in caps]))
                captions += caps
        bar.update(len(batch))
    count = len(sources)
    key = autoencoder.store_key
    if encoded:
        arrays = {key: np.concatenate(encoded)}
    else:  # every file of the shard was unreadable: an empty shard of the right shape
        size = source.resolution // autoencoder.downsample_factor
        arrays = {key: np.zeros((0, views, *autoencoder.store_shape(size)), autoencoder.store_dtype)}
    info: dict[str, Any] = {"count": count, "source_indices": sources, "skipped": skipped}
    if text_encoder is None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    else:
        d = text_encoder.dim
        arrays["text"] = np.concatenate(text) if text else np.zeros((0, text_encoder.rows, d), np.float16)
        arrays["text_offsets"] = np.asarray(offsets, dtype=np.int64)
        info["ids"] = labels
        info["captions"] = captions
    return arrays, info


def _finalize(out: Path, plan: dict[str, Any], num_shards: int, autoencoder, text_encoder, resolution: int) -> dict:
    """Write empty_text.npy and store.json once every shard is complete; remove what crashed writes left."""
    for leftover in [*(out / "shards").glob(".tmp-*"), *out.glob(".*.tmp-*")]:
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    infos = [check_shard(out / "shards" / shard_name(k)) for k in range(num_shards)]
    skipped = [s for info in infos for s in info["skipped"]]
    key = autoencoder.store_key
    shape = next(info["arrays"][key]["shape"] for info in infos)
    f = autoencoder.downsample_factor
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "count": sum(info["count"] for info in infos),
        "num_shards": num_shards,
        "shard_size": plan["shard_size"],
        "resolution": resolution,
        "latent_shape": [autoencoder.latent_channels, resolution // f, resolution // f],
        f"{key}_shape": shape[1:],
        f"{key}_dtype": np.dtype(autoencoder.store_dtype).name,
        "tokens": autoencoder.token_facts(),
        "views": plan["views"],
        "vae": plan["vae"],
        "num_classes": len(plan["source"]["classes"]) if plan["source"].get("classes") else 0,
        "classes": plan["source"].get("classes"),
        "text": plan["text"],
        "num_captions": sum(info["arrays"]["text"]["shape"][0] for info in infos) if text_encoder else 0,
        "source": {k: v for k, v in plan["source"].items() if k != "classes"},
        "skipped": {"count": len(skipped), "first": skipped[:_SKIPPED_LISTED]},
        "versions": framework_versions(),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if text_encoder is not None:
        empty = text_encoder([""])[0].to(torch.float16).cpu().numpy()  # (L, D): the null condition for CFG
        save_array(out / "empty_text.npy", empty)
    # checksums of what the shards' own records do not cover (`python -m latentdiff.verify` checks them all)
    shards = out / "shards"
    meta["sha256"] = {shard_name(k): sha256_file(shards / shard_name(k) / "index.json") for k in range(num_shards)}
    if text_encoder is not None:
        meta["sha256"]["empty_text.npy"] = sha256_file(out / "empty_text.npy")
    write_json(out / "store.json", meta)
    return meta


def run_extraction(cfg: DictConfig) -> dict[str, Any]:
    """Encode `cfg.data` (an image source) with `cfg.vae` (and `cfg.text_encoder`) into the store `cfg.out`.

    Returns:
        The store's metadata (store.json) when this process completed it, else a summary of this rank's work.
    """
    rank, world, local_rank = dist_env()
    with user_errors():
        if not cfg.get("out") or cfg.out == "???":
            raise ConfigError("out=??? is missing; set out=<folder of the new latent store>")
        check_config(cfg, "extract")
        source = instantiate(cfg.data)
        if not hasattr(source, "describe"):
            raise ConfigError(
                f"data={cfg.data._target_} is not an image source; use data=imagenet_folder or coco_captions"
            )
        device = device_for(str(cfg.device), local_rank)
        autoencoder = instantiate(cfg.vae).to(device)
        text_encoder = instantiate(cfg.text_encoder).to(device) if cfg.get("text_encoder") else None
        if source.kind == "coco_captions" and text_encoder is None:
            raise ConfigError(
                "data=coco_captions needs text features: add text_encoder=clip_vit_l14 "
                "(or text_encoder=local text_encoder.pretrained=<dir>)"
            )
        if source.kind != "coco_captions" and text_encoder is not None:
            raise ConfigError(f"text_encoder={cfg.text_encoder._target_} needs captions; data={source.kind} has none")
        if autoencoder.store_dtype == np.uint16 and autoencoder.codebook_size > 65536:
            raise ConfigError(
                f"vae={autoencoder.pretrained} has {autoencoder.codebook_size} codes; token stores hold uint16 ids "
                "(at most 65536 codes)"
            )
        if source.resolution % autoencoder.downsample_factor:
            raise ConfigError(
                f"resolution={source.resolution} is not a multiple of the VAE's downsampling "
                f"factor {autoencoder.downsample_factor}"
            )
        out = Path(cfg.out)
        plan = {
            "format": FORMAT,
            "version": VERSION,
            "source": source.describe(),
            "vae": autoencoder.describe(),
            "text": text_encoder.fingerprint() if text_encoder is not None else None,
            "shard_size": int(cfg.shard_size),
            "views": 2 if cfg.flip else 1,
        }
        complete = _prepare_out(out, plan)

    num_shards = math.ceil(len(source) / cfg.shard_size)
    mine = [k for k in range(num_shards) if k % world == rank]
    # a re-run (of a complete store, or of an interrupted extraction) verifies the checksums of the shards on disk
    # (hashing is fast next to encoding); a damaged shard is encoded again
    log.info("%s: verifying the checksums of the shards on disk (%d for this rank)", out, len(mine))
    todo = [k for k in mine if not _shard_complete(out, k, verify=True)]
    if complete:
        if not todo and _store_records_hold(out):
            with contextlib.suppress(FileNotFoundError):  # gone: another rank found damage and writes it again
                meta = json.loads((out / "store.json").read_text())
                log.info("%s is a complete store and every checksum matches; nothing to do", out)
                return meta
        (out / "store.json").unlink(missing_ok=True)  # incomplete until the damaged parts are written again
    total = sum(len(range(k * cfg.shard_size, min((k + 1) * cfg.shard_size, len(source)))) for k in todo)
    log.info(
        "rank %d/%d: %d of %d shards to encode (%d images) on %s", rank, world, len(todo), len(mine), total, device
    )
    start = time.perf_counter()
    with tqdm(total=total, desc=f"extract rank {rank}", unit="img", disable=rank != 0 or None) as bar:
        for k in todo:
            items = range(k * cfg.shard_size, min((k + 1) * cfg.shard_size, len(source)))
            arrays, info = _encode_shard(source, items, autoencoder, text_encoder, cfg, device, bar)
            if info["skipped"]:
                log.warning(
                    "%s: %d unreadable files skipped, first %s", shard_name(k), len(info["skipped"]), info["skipped"][0]
                )
            write_shard(out, k, arrays, info)
    seconds = time.perf_counter() - start
    summary = {
        "rank": rank,
        "shards": len(todo),
        "images": total,
        "seconds": seconds,
        "images_per_s": total / seconds if seconds > 0 and total else 0.0,
    }
    if all(_shard_complete(out, k) for k in range(num_shards)):
        meta = _finalize(out, plan, num_shards, autoencoder, text_encoder, source.resolution)
        if meta["skipped"]["count"]:
            first = meta["skipped"]["first"][0]
            log.warning(
                "%d unreadable files were skipped (first: %s: %s); all are listed in the shards' index.json",
                meta["skipped"]["count"],
                first[0],
                first[1],
            )
        log.info("store %s complete: %d items in %d shards", out, meta["count"], num_shards)
        return {**meta, "extraction": summary}
    log.info("rank %d done; the last rank to finish writes store.json", rank)
    return summary


def main() -> None:
    from latentdiff.cli import CONF_DIR, hydra_entry

    hydra_entry(run_extraction, CONF_DIR, "extract", cleanup_run_dir=False)


if __name__ == "__main__":
    main()
