"""sample.py and the FID callback: per-index determinism, resume, sharding, objectives end to end, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from latentdiff.samplers.conditions import class_labels
from latentdiff.samplers.image import module_sampler
from latentdiff.train import build_module, run_training

from .artefacts import make_inception_weights
from .conftest import ROOT, TINY_RUN
from .test_cli import _run


@pytest.fixture(scope="module")
def quick_ckpt(tmp_path_factory) -> Path:
    """A 3-step class-conditional U-ViT run on the shapes (4 classes) and its last.ckpt."""
    from .conftest import compose_config

    root = tmp_path_factory.mktemp("ckpt")
    result = run_training(compose_config(TINY_RUN, root))
    return Path(result["run_dir"]) / "last.ckpt"


def _module(compose_cfg, *overrides: str):
    torch.manual_seed(0)
    module = build_module(compose_cfg([*TINY_RUN, *overrides])).eval()
    module.latent_shape = (3, 32, 32)
    return module


@pytest.mark.parametrize("sampler", ["ddpm", "dpm_solver"])
def test_an_index_gives_the_same_image_whatever_the_batch(compose_cfg, sampler):
    module = _module(compose_cfg, f"sampler={sampler}")
    cfg = compose_cfg([*TINY_RUN, f"sampler={sampler}"])
    from hydra.utils import instantiate

    sampler_ = module_sampler(module, instantiate(cfg.sampler.scheduler), 4, guidance_scale=2.0, seed=7)
    labels = class_labels(range(6), 4, seed=7)
    whole = sampler_.images(list(range(6)), labels)  # (6, 32, 32, 3) uint8
    order = [4, 1, 5]
    part = sampler_.images(order, labels[order])
    again = torch.cat([sampler_.images([0, 1], labels[:2]), sampler_.images([2, 3, 4, 5], labels[2:])])
    assert (whole[order].int() - part.int()).abs().max() <= 1  # float sums may round one level differently
    assert (whole.int() - again.int()).abs().max() <= 1
    other = module_sampler(module, instantiate(cfg.sampler.scheduler), 4, guidance_scale=2.0, seed=8)
    assert (whole.int() - other.images(list(range(6)), labels).int()).abs().float().mean() > 10  # seeds matter


def test_labels_are_per_index():
    a, b = class_labels([3, 9, 4], 1000, seed=1), class_labels([9], 1000, seed=1)
    assert a[1] == b[0] and len(set(class_labels(range(200), 1000, seed=1).tolist())) > 150
    assert class_labels([0, 5, 6], 4, 0, "balanced").tolist() == [0, 1, 2]
    assert class_labels([0, 1, 2], 4, 0, [3, 1]).tolist() == [3, 1, 3]


def test_cfg_with_w_1_equals_the_conditional_model(compose_cfg):
    from hydra.utils import instantiate

    module = _module(compose_cfg, "sampler=ddim")
    cfg = compose_cfg([*TINY_RUN, "sampler=ddim"])
    labels = torch.tensor([0, 1, 2])
    guided = module_sampler(module, instantiate(cfg.sampler.scheduler), 3, guidance_scale=1.0).latents(
        [0, 1, 2], labels
    )
    backbone = module.sampling_backbone
    forced = []  # the conditional model alone, in a loop that never sees a null condition

    def conditional_only(x, t, cond):
        forced.append(cond)
        return backbone(x, t, labels)

    plain = module_sampler(module, instantiate(cfg.sampler.scheduler), 3, guidance_scale=1.0)
    assert plain.device.type == "cpu"
    plain.backbone = conditional_only
    plain.null_cond = lambda c: None
    torch.testing.assert_close(plain.latents([0, 1, 2], labels), guided, rtol=0, atol=0)
    assert all(c is not None and c.shape == (3,) for c in forced)


def _sample(tmp_path: Path, *args: str):
    return _run(tmp_path, [str(ROOT / "sample.py"), *args])


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def test_sample_py_writes_adm_npz_pngs_provenance_and_resumes(quick_ckpt, tmp_path):
    out = tmp_path / "s"
    args = [f"ckpt={quick_ckpt}", "sampler.steps=3", f"out={out}", "guidance_scale=1.5"]
    first = _sample(tmp_path, *args, "num_samples=6", "batch_size=4")
    assert first.returncode == 0, first.stderr[-3000:]
    arrays = _npz(out / "samples.npz")
    assert set(arrays) == {"arr_0", "arr_1"}
    assert arrays["arr_0"].shape == (6, 32, 32, 3) and arrays["arr_0"].dtype == np.uint8
    assert arrays["arr_1"].tolist() == class_labels(range(6), 4, seed=0).tolist()
    assert sorted(p.name for p in (out / "images").glob("*.png")) == [f"{i:06d}.png" for i in range(6)]
    meta = json.loads((out / "samples.json").read_text())
    assert meta["complete"] and meta["weights"] == "ema" and meta["global_step"] == 3
    assert meta["sampler"]["steps"] == 3 and meta["sampler"]["guidance_scale"] == 1.5
    assert meta["sampler"]["scheduler"]["_target_"].startswith("diffusers.DPMSolverMultistepScheduler")

    # an interrupted run: the parts of indices >= 4 are gone; the re-run makes only those, and more
    for part in (out / "parts").glob("*.json"):
        if json.loads(part.read_text())["indices"][0] >= 4:
            part.unlink()
    again = _sample(tmp_path, *args, "num_samples=9", "batch_size=2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "5 of 9 samples to make" in again.stdout + again.stderr
    extended = _npz(out / "samples.npz")
    assert extended["arr_0"].shape[0] == 9
    done = _sample(tmp_path, *args, "num_samples=9", "batch_size=2")
    assert done.returncode == 0 and "already holds the 9 samples asked for" in done.stdout + done.stderr
    assert (extended["arr_0"][:6].astype(int) - arrays["arr_0"].astype(int)).__abs__().max() <= 1

    # two processes share the indices; the images are those of one process
    two = _sample(tmp_path, *args, "num_samples=9", "batch_size=3", "devices=2", f"out={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    parted = _npz(tmp_path / "two" / "samples.npz")
    assert (parted["arr_0"].astype(int) - extended["arr_0"].astype(int)).__abs__().max() <= 1
    assert parted["arr_1"].tolist() == extended["arr_1"].tolist()
    assert {p.name[:4] for p in (tmp_path / "two" / "parts").glob("*.npy")} == {"r000", "r001"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model.depth=4"], "ckpt={ckpt} does not fit model=UViT of this config: "),
        (["sampler=flow_euler"], "sampler.scheduler=FlowMatchEulerDiscreteScheduler cannot sample a Gaussian"),
        (["labels=[7]"], "labels=[7] must be class ids in [0, 4)"),
        (["num_samples=0"], "num_samples=0 must be a positive integer"),
        (["ckpt=missing.ckpt"], "ckpt=missing.ckpt does not exist"),
        (["use_ema=true", "precision=fp8"], "precision='fp8' is not supported; use one of fp32, bf16, fp16"),
    ],
)
def test_sample_py_bad_input_is_one_line(quick_ckpt, tmp_path, args, message):
    result = _sample(tmp_path, f"ckpt={quick_ckpt}", "num_samples=2", "sampler.steps=2", f"out={tmp_path}/s", *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0] == "error: " + lines[0][7:] and message.format(ckpt=quick_ckpt) in lines[0]
    assert not (tmp_path / "s").exists()  # nothing was written


def test_sample_py_refuses_a_folder_of_other_samples(quick_ckpt, tmp_path):
    out = tmp_path / "s"
    ok = _sample(tmp_path, f"ckpt={quick_ckpt}", "num_samples=2", "sampler.steps=2", f"out={out}")
    assert ok.returncode == 0, ok.stderr[-2000:]
    before = (out / "samples.npz").read_bytes()
    bad = _sample(tmp_path, f"ckpt={quick_ckpt}", "num_samples=2", "sampler.steps=3", f"out={out}")
    assert bad.returncode == 2
    assert "holds samples made differently: sampler.steps: 2 there, 3 now; choose another out=" in bad.stderr
    assert (out / "samples.npz").read_bytes() == before


@pytest.mark.parametrize(
    "overrides",
    [
        ["diffusion=linear"],
        ["diffusion=cosine_v"],
        ["diffusion=linear", "diffusion.scheduler.prediction_type=sample", "sampler=ddim"],
        ["diffusion=zero_snr", "sampler=ddim"],
        ["diffusion=flow", "sampler=flow_euler"],
        ["diffusion=flow", "diffusion.time_sampling=logit_normal", "sampler=flow_heun"],
    ],
    ids=["epsilon", "v", "x0", "zero-snr-v", "flow", "flow-logit-normal-heun"],
)
def test_each_objective_trains_and_samples(compose_cfg, overrides):
    cfg = compose_cfg([*TINY_RUN, *overrides, "trainer.max_steps=4", "sampler.steps=3"])
    result = run_training(cfg)
    assert np.isfinite(result["metrics"]["val/loss"])
    run = Path(result["run_dir"])
    assert (run / "samples" / "step_0000004.png").is_file()
    ckpt = torch.load(run / "last.ckpt", weights_only=True)
    module = build_module(cfg)
    module.load_state_dict(ckpt["state_dict"])
    module.latent_shape = (3, 32, 32)
    from hydra.utils import instantiate

    images = module_sampler(module.eval(), instantiate(cfg.sampler.scheduler), 3).images([0, 1], torch.tensor([0, 1]))
    assert images.shape == (2, 32, 32, 3) and images.dtype == torch.uint8 and images.float().std() > 0


def test_fid_callback_logs_and_keeps_the_best_checkpoint(compose_cfg, tmp_path):
    from latentdiff.data import render_shapes

    weights = make_inception_weights(tmp_path / "inception.pth")
    images, _ = render_shapes(16, seed=3)
    np.savez(tmp_path / "ref.npz", arr_0=images.permute(0, 2, 3, 1).numpy())
    cfg = compose_cfg(
        [
            *TINY_RUN,
            "trainer.max_steps=4",
            "callbacks=fid",
            "callbacks.progress_bar=null",
            "callbacks.sample_grid.every_n_steps=0",
            f"callbacks.fid.reference={tmp_path / 'ref.npz'}",
            "callbacks.fid.num_samples=6",
            "callbacks.fid.every_n_steps=2",
            "callbacks.fid.batch_size=3",
            f"callbacks.fid.inception_weights={weights}",
            f"callbacks.fid.cache_dir={tmp_path / 'cache'}",
        ]
    )
    result = run_training(cfg)
    run = Path(result["run_dir"])
    rows = [r for r in _csv(run / "metrics.csv") if r.get("val/fid_6")]
    assert [int(r["step"]) for r in rows] == [2, 4], rows
    values = [float(r["val/fid_6"]) for r in rows]
    assert all(np.isfinite(values)) and min(values) > 0
    best = torch.load(run / "best_fid.ckpt", weights_only=True)
    assert best["global_step"] in (2, 4)
    state = next(v for k, v in best["callbacks"].items() if k.startswith("FID"))
    assert state["best"] == pytest.approx(min(values), rel=1e-6)
    assert result["metrics"]["val/fid_6"] == pytest.approx(values[-1], rel=1e-6)


def _csv(path: Path) -> list[dict]:
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def test_model_pretrained_loads_weights_files_and_sets_the_official_offset(compose_cfg, tmp_path):
    from safetensors.torch import save_file

    from latentdiff.models.build import build_backbone

    torch.manual_seed(0)
    source = build_backbone(compose_cfg(TINY_RUN).model)
    torch.save(source.state_dict(), tmp_path / "official.pth")  # the official release format: a plain state dict
    save_file(source.state_dict(), str(tmp_path / "weights.safetensors"))
    for file in ("official.pth", "weights.safetensors"):
        loaded = build_backbone(compose_cfg([*TINY_RUN, f"model.pretrained={tmp_path / file}"]).model)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), source.state_dict().values()))
    # official latent presets add 1 to t when they load weights (trained on n = t + 1), not when trained here
    assert compose_cfg(["model=uvit_h2"]).model.timestep_offset == 0
    assert compose_cfg(["model=uvit_h2", "model.pretrained=x.pth"]).model.timestep_offset == 1
    assert compose_cfg(["model=uvit_h2", "model.pretrained=run/last.ckpt"]).model.timestep_offset == 0
    assert compose_cfg(["model=uvit_h2", "model.pretrained=w.safetensors"]).model.timestep_offset == 0
    with pytest.raises(ValueError, match=r"model.pretrained=.*official.pth does not fit the configured UViT: "):
        build_backbone(compose_cfg([*TINY_RUN, "model.depth=4", f"model.pretrained={tmp_path / 'official.pth'}"]).model)
    with pytest.raises(FileNotFoundError, match="https://github.com/baofff/U-ViT#pretrained-models"):
        build_backbone(compose_cfg([*TINY_RUN, f"model.pretrained={tmp_path / 'missing.pth'}"]).model)


def test_training_refuses_a_sampler_that_cannot_follow_the_objective_before_it_starts(compose_cfg):
    from latentdiff.errors import ConfigError

    for overrides, message in (
        (["diffusion=zero_snr", "sampler=heun"], "HeunDiscreteScheduler cannot follow the zero-terminal-SNR schedule"),
        (["sampler.guidance_interval=[800,100]"], r"sampler.guidance_interval=\[800, 100\] must be \[low, high\]"),
    ):
        with pytest.raises(ConfigError, match=message):
            run_training(compose_cfg([*TINY_RUN, *overrides]))
