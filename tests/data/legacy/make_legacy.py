"""Write the legacy test data: files made by latentdiff *before* the redesign of issue 18, and what that code
computed from them. `tests/test_legacy.py` loads them through the public commands and compares.

Written by the code at commit d965f91 (`git rev-parse HEAD` of the base of the redesign):
d965f91 "Review: one import place in hydra_entry, a plainer shard-file check, one verification pass in extraction".
Do not re-run it after the redesign: the point of these files is that the *old* code wrote them. Re-running it
(from the repository root, `PYTHONPATH=src python tests/data/legacy/make_legacy.py`) overwrites them with files of
the code of the day, which tests nothing about compatibility.

    uvit_run/        last.ckpt, config.yaml, metrics.csv of a 2-step class-conditional U-ViT run (width 16,
                     depth 2) on the built-in shapes, as `train.py` writes them (`run_training` in-process)
    uvit_export/     `latentdiff.export` of uvit_run/last.ckpt (EMA weights)
    tokens_run/      last.ckpt, config.yaml of a 2-step masked-token run (tiny UVit2D on the in-memory tiny VQ)
    tokens_export/   `latentdiff.export` of tokens_run/last.ckpt
    store/           a latent store by `latentdiff.extract`: 6 shape images (3 classes) at 32 px, tiny
                     AutoencoderKL of `tests/artefacts.make_tiny_vae(seed=0)`, 2 shards of 4 and 2 images
    expected/        expected.json (the overrides and the numbers), samples_uvit.npz, samples_tokens.npz,
                     backbone_io.npz (fixed inputs and the export's outputs), store_batch.npz (the datamodule's
                     first training batch), resumed_uvit.safetensors (uvit_run resumed for one step: the weights)

Machine-dependent content: the stored run configs hold `paths.*` as the relative `work/...` (the runs were made
with that as the working directory); the store's metadata holds the absolute path of the tiny VAE at the time and
of the image folder, and the export's `model_index.json` the absolute path of the checkpoint. Nothing loads them:
the store is matched to a VAE by a probe of its encoder weights, so the test rebuilds the VAE with
`make_tiny_vae(seed=0)` and passes its folder as `vae.pretrained` (the same torch version gives the same weights).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))

from tests.artefacts import TINY_VAE_FACTOR, make_image_folder, make_tiny_vae  # noqa: E402
from tests.conftest import TINY_RUN, compose_config  # noqa: E402
from tests.test_latents import compose_entry  # noqa: E402

from latentdiff.data import LatentDataModule  # noqa: E402
from latentdiff.export import export, load_exported  # noqa: E402
from latentdiff.extract import run_extraction  # noqa: E402
from latentdiff.sampling import run_sampling  # noqa: E402
from latentdiff.training import run_training  # noqa: E402
from latentdiff.verify import verify_path  # noqa: E402

UVIT_RUN = [
    *TINY_RUN,
    "model.embed_dim=16",
    "model.depth=2",
    "model.num_heads=2",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "callbacks.loss_curve=null",
]
TOKENS_RUN = [
    "experiment=quickstart_tokens",
    "trainer.precision=32-true",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.progress_bar=null",
    "callbacks.loss_curve=null",
    "callbacks.sample_grid.every_n_steps=0",
    "sampler.steps=4",
    "data.num_train=64",
    "data.num_val=16",
    "data.batch_size=8",
    "model.hidden_size=16",
    "model.micro_cond_encode_dim=2",
    "model.micro_cond_embed_dim=10",
    "model.encoder_hidden_size=8",
    "model.in_channels=8",
    "model.block_out_channels=8",
    "model.block_num_heads=2",
    "model.num_hidden_layers=1",
    "model.num_attention_heads=2",
    "model.intermediate_size=16",
]
UVIT_SAMPLE = ["num_samples=6", "batch_size=3", "sampler.steps=3", "guidance_scale=1.5", "save_png=false"]
TOKENS_SAMPLE = ["num_samples=6", "batch_size=3", "labels=balanced", "save_png=false"]
STORE_DATA = {"image_size": 32, "num_classes": 3, "batch_size": 4, "num_workers": 0, "latent_size": 8}
STORE_DATA.update(latent_channels=4, shuffle_seed=0)
RUN_FILES = ("last.ckpt", "config.yaml", "metrics.csv")


def _train(overrides: list[str], name: str) -> Path:
    result = run_training(compose_config(overrides, Path("work") / name))
    run = Path(result["run_dir"])
    out = HERE / f"{name}_run"
    out.mkdir()
    for file in RUN_FILES:
        if (run / file).is_file():
            shutil.copy2(run / file, out / file)
    return out


def _sample(ckpt: Path, args: list[str], out: Path) -> dict[str, np.ndarray]:
    full = [f"ckpt={ckpt}", f"out={out}", *args]
    run_sampling(compose_entry("sample", full), full)
    with np.load(out / "samples.npz") as npz:
        return {k: npz[k] for k in npz.files}


def _backbone_io(uvit_export: Path, tokens_export: Path) -> dict[str, np.ndarray]:
    """Fixed inputs and the outputs of each export's backbone (`load_exported`)."""
    g = torch.Generator().manual_seed(0)
    io = {
        "uvit_x": torch.randn(2, 3, 32, 32, generator=g),
        "uvit_t": torch.tensor([3, 999]),
        "uvit_cond": torch.tensor([2, 4]),  # 4 is the null class
        "tokens_x": torch.randint(0, 257, (2, 8, 8), generator=g),  # 256 is the mask id
        "tokens_cond": torch.tensor([1, 4]),
    }
    with torch.no_grad():
        io["uvit_out"] = load_exported(uvit_export)(io["uvit_x"], io["uvit_t"], io["uvit_cond"])
        io["tokens_out"] = load_exported(tokens_export)(io["tokens_x"], None, io["tokens_cond"])
    return {k: v.numpy() for k, v in io.items()}


def main() -> None:
    torch.set_num_threads(2)  # as the tests run (tests/conftest.py)
    for name in ("uvit_run", "uvit_export", "tokens_run", "tokens_export", "store", "expected"):
        shutil.rmtree(HERE / name, ignore_errors=True)
    (HERE / "expected").mkdir()
    expected: dict = {
        "commit": "d965f91",
        "uvit_run": UVIT_RUN,
        "tokens_run": TOKENS_RUN,
        "uvit_sample": UVIT_SAMPLE,
        "tokens_sample": TOKENS_SAMPLE,
        "store_data": STORE_DATA,
        "tiny_vae_seed": 0,
    }
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)  # the runs store relative paths (work/...)
        try:
            tmp = Path(tmp)
            uvit, tokens = _train(UVIT_RUN, "uvit"), _train(TOKENS_RUN, "tokens")
            export(uvit / "last.ckpt", HERE / "uvit_export")
            export(tokens / "last.ckpt", HERE / "tokens_export")
            np.savez(HERE / "expected/backbone_io.npz", **_backbone_io(HERE / "uvit_export", HERE / "tokens_export"))
            np.savez(HERE / "expected/samples_uvit.npz", **_sample(uvit / "last.ckpt", UVIT_SAMPLE, tmp / "su"))
            np.savez(HERE / "expected/samples_tokens.npz", **_sample(tokens / "last.ckpt", TOKENS_SAMPLE, tmp / "st"))

            # uvit_run resumed for one step (resume=<run dir>), as a user continues a run
            shutil.copytree(uvit, tmp / "again" / "run")
            result = run_training(
                compose_config([*UVIT_RUN, "trainer.max_steps=3", f"resume={tmp / 'again' / 'run'}"], tmp / "again")
            )
            state = torch.load(tmp / "again/run/last.ckpt", weights_only=True)["state_dict"]
            weights = {k: v.clone() for k, v in state.items() if k.startswith(("backbone.", "ema.model."))}
            save_file(weights, str(HERE / "expected/resumed_uvit.safetensors"))
            expected["resumed_step"] = result["global_step"]
            expected["resumed_train_loss"] = result["metrics"]["train/loss"]

            vae = make_tiny_vae(tmp / "vae", seed=0)
            folder = make_image_folder(tmp / "images", per_class=2, corrupt=0)
            extract = [f"data.root={folder}", "resolution=32", "vae=local", f"vae.pretrained={vae}"]
            extract += [f"vae.downsample_factor={TINY_VAE_FACTOR}", "shard_size=4", "batch_size=4", "num_workers=0"]
            expected["store_meta"] = run_extraction(compose_entry("extract", [*extract, f"out={HERE / 'store'}"]))
            batch = next(iter(LatentDataModule(root=str(HERE / "store"), **STORE_DATA).train_dataloader()))
            np.savez(HERE / "expected/store_batch.npz", **{k: v.numpy() for k, v in batch.items()})
        finally:
            os.chdir(cwd)
    expected["verify"] = {
        name: [{k: r[k] for k in ("kind", "bytes")} for r in verify_path(HERE / name)]
        for name in ("store", "uvit_run/last.ckpt", "tokens_run/last.ckpt")
    }
    (HERE / "expected/expected.json").write_text(json.dumps(expected, indent=2, default=str) + "\n")
    total = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file())
    print(f"wrote {HERE}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
