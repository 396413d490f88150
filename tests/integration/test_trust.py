"""A file someone shares never chooses what code runs (`latentdiff.trust`, `weights_only=True` everywhere).

Each payload would create a marker file if it ran. A positive control shows that each one is live (Hydra's
`instantiate` or `torch.load(weights_only=False)` does create the marker); then every entry that reads such
a file refuses it in one `error:` line naming the file, and no marker exists afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from latentdiff import renames, trust
from latentdiff.errors import ConfigError
from latentdiff.export import export, load_exported
from latentdiff.train import run_training

from ..conftest import TINY_RUN, compose_config
from ..entries import one_line_error, snapshot
from ..helpers.trust import Touch, open_node, pickle_node


def _payloads(marker: Path) -> dict[str, callable]:
    """name -> a function that poisons a stored run config (a dict) in place."""

    def put(path: str, node):
        def poison(config: dict) -> None:
            *parents, last = path.split(".")
            target = config
            for part in parents:
                target = target[part]
            target[last] = node

        return poison

    def nested_in_allowed(config: dict) -> None:  # an allowed class whose argument is a call
        config["model"]["embed_dim"] = open_node(marker)

    def args_trick(config: dict) -> None:  # Hydra's positional arguments
        config["vae"]["_args_"] = [open_node(marker)]

    def partial_trick(config: dict) -> None:  # an allowed class turned into a partial
        config["diffusion"]["_partial_"] = True
        config["diffusion"]["scheduler"] = pickle_node(marker)

    return {
        "vae-open": put("vae", open_node(marker)),
        "vae-pickle": put("vae", pickle_node(marker)),
        "model-pickle": put("model", pickle_node(marker)),
        "scheduler-pickle": put("diffusion.scheduler", pickle_node(marker)),
        "sampler-pickle": put("sampler.scheduler", pickle_node(marker)),
        "nested-in-allowed": nested_in_allowed,
        "args": args_trick,
        "partial": partial_trick,
    }


PAYLOADS = list(_payloads(Path("x")))


@pytest.fixture(scope="module")
def real_ckpt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trust")
    return Path(run_training(compose_config(TINY_RUN, root))["run_dir"]) / "last.ckpt"


def _crafted(real_ckpt: Path, folder: Path, payload: str, marker: Path) -> Path:
    ckpt = torch.load(real_ckpt, map_location="cpu", weights_only=True)
    _payloads(marker)[payload](ckpt["latentdiff"]["config"])
    path = folder / f"{payload}.ckpt"
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("entry", ["sample", "export"])
def test_a_crafted_checkpoint_runs_no_code(real_ckpt, tmp_path, monkeypatch, capfd, entry, payload):
    marker = tmp_path / "marker"
    crafted = _crafted(real_ckpt, tmp_path, payload, marker)
    assert torch.load(crafted, weights_only=True)  # weights_only accepts the file: the config is the attack
    before = snapshot(tmp_path)
    line, code = one_line_error(entry, [f"ckpt={crafted}", f"out={tmp_path}/out"], tmp_path, monkeypatch, capfd)
    assert not marker.exists()
    assert line.startswith(f"error: ckpt={crafted}: ") and "refusing to build it" in line, line
    assert code == 2 and snapshot(tmp_path) == before


def test_the_read_only_groups_of_a_checkpoint_are_never_imported(real_ckpt, tmp_path, monkeypatch, capfd):
    """`data` and `module` are only read by sample.py: their `_target_`s are never imported (importing a module
    runs its top-level code), even though checking the built groups' arguments inspects their classes."""
    import sys

    from hydra.core.global_hydra import GlobalHydra

    from ..entries import entry

    marker = tmp_path / "marker"
    (tmp_path / "ld_import_marker.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass X: ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpt = torch.load(real_ckpt, map_location="cpu", weights_only=True)
    config = ckpt["latentdiff"]["config"]
    config["data"]["_target_"] = "ld_import_marker.X"
    config["module"]["ema"] = {"_target_": "ld_import_marker.X", "_partial_": True}
    crafted = tmp_path / "crafted.ckpt"
    torch.save(ckpt, crafted)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["sample.py", f"ckpt={crafted}", f"out={tmp_path}/out", "num_samples=2"])
    GlobalHydra.instance().clear()
    entry("sample")()
    assert (tmp_path / "out" / "samples.npz").is_file()
    assert not marker.exists() and "ld_import_marker" not in sys.modules


def test_the_refusal_names_the_key_and_the_target(real_ckpt, tmp_path):
    marker = tmp_path / "marker"
    ckpt = torch.load(real_ckpt, map_location="cpu", weights_only=True)
    _payloads(marker)["scheduler-pickle"](ckpt["latentdiff"]["config"])
    with pytest.raises(ConfigError, match=r"diffusion\.scheduler\._target_='torch\.load' is not a class latentdiff"):
        trust.build(ckpt["latentdiff"]["config"]["diffusion"], "ckpt=x", "diffusion")
    with pytest.raises(ConfigError, match=r"vae\.pretrained='\$\{oc\.env:HOME\}' is an interpolation"):
        trust.check(
            {"_target_": "latentdiff.autoencoder.FrozenAutoencoderKL", "pretrained": "${oc.env:HOME}"}, "x", "vae"
        )
    assert not marker.exists()


def _exported(real_ckpt: Path, out: Path) -> Path:
    export(real_ckpt, out)
    return out


def test_an_export_whose_metadata_names_code_is_refused(real_ckpt, tmp_path):
    marker = tmp_path / "marker"
    folder = _exported(real_ckpt, tmp_path / "export")
    record = json.loads((folder / "latentdiff.json").read_text())
    record["config"]["model"] = pickle_node(marker) | {"f": {"_target_": "io.StringIO"}}
    (folder / "latentdiff.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError) as err:
        load_exported(folder)
    assert str(err.value).startswith(f"{folder}/latentdiff.json: model._target_='torch.load' is not a class")
    assert "\n" not in str(err.value) and not marker.exists()

    from safetensors.torch import load_file, save_file

    weights = folder / "backbone.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"latentdiff_model": json.dumps(open_node(marker))})
    with pytest.raises(ConfigError, match=r"backbone\.safetensors \(metadata\): model\._target_='builtins\.open'"):
        load_exported(weights)
    assert not marker.exists()


def test_a_crafted_inception_weights_file_runs_no_code(tmp_path, monkeypatch, capfd):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    marker, control = tmp_path / "marker", tmp_path / "control"
    crafted = tmp_path / "inception.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "hook": Touch(marker)}, crafted)
    torch.save({"hook": Touch(control)}, tmp_path / "control.pth")
    with pytest.raises(Exception):  # noqa: B017 - the point is that it ran before failing
        FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(tmp_path / "control.pth")
        )
    assert control.exists()  # torch-fidelity's own loader runs the pickle
    import numpy as np

    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    args = [f"samples={tmp_path}/samples.npz", "metrics=[isc]", f"inception_weights={crafted}"]
    line, _ = one_line_error("evaluate", args, tmp_path, monkeypatch, capfd)
    assert line.startswith(f"error: inception_weights={crafted} was refused: it holds pickled objects"), line
    assert not marker.exists()

    from latentdiff.inception import Inception

    with pytest.raises(ConfigError, match="was refused"):  # the FID callback's path
        Inception(str(crafted))
    assert not marker.exists()


def test_a_crafted_weights_file_for_model_pretrained_runs_no_code(tmp_path, monkeypatch, capfd):
    marker = tmp_path / "marker"
    torch.save({"pos_embed": torch.zeros(1), "hook": Touch(marker)}, tmp_path / "weights.pt")
    args = [f"paths.log_dir={tmp_path}/outputs", *TINY_RUN, f"model.pretrained={tmp_path}/weights.pt"]
    line, _ = one_line_error("train", args, tmp_path, monkeypatch, capfd)
    assert line.startswith(f"error: model.pretrained={tmp_path}/weights.pt was refused: it holds pickled"), line
    assert not marker.exists() and snapshot(tmp_path) == {"weights.pt": snapshot(tmp_path)["weights.pt"]}


def test_a_checkpoint_with_the_old_objective_name_exports_under_the_new_one(real_ckpt, tmp_path):
    ckpt = torch.load(real_ckpt, map_location="cpu", weights_only=True)
    current = ckpt["latentdiff"]["config"]["diffusion"]["_target_"]
    old = next(k for k, v in renames.LEGACY_TARGETS.items() if v == current)
    ckpt["latentdiff"]["config"]["diffusion"]["_target_"] = old
    torch.save(ckpt, tmp_path / "old.ckpt")
    export(tmp_path / "old.ckpt", tmp_path / "export")
    record = json.loads((tmp_path / "export" / "latentdiff.json").read_text())
    assert record["config"]["diffusion"]["_target_"] == current


def test_a_pipeline_whose_configs_name_code_is_refused(real_ckpt, tmp_path):
    """The export's diffusers pipeline builds its backbone and sampler from the allow-list too: a crafted
    `transformer/config.json` or `model_index.json` is refused in one line and runs nothing."""
    from diffusers import DiffusionPipeline

    marker = tmp_path / "marker"
    folder = _exported(real_ckpt, tmp_path / "export")
    config_file, index_file = folder / "transformer" / "config.json", folder / "model_index.json"
    config, index = json.loads(config_file.read_text()), json.loads(index_file.read_text())
    torch.save(Touch(marker), tmp_path / "payload.pt")
    load_payload = {"_target_": "torch.load", "f": str(tmp_path / "payload.pt"), "weights_only": False}
    config_file.write_text(json.dumps({**config, "model": load_payload}))
    with pytest.raises(ConfigError, match=r"the export's config\.json: model\._target_='torch\.load' is not a class"):
        DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    config_file.write_text(json.dumps(config))
    index["sampling"]["sampler"]["scheduler"] = open_node(marker)
    index_file.write_text(json.dumps(index))
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    with pytest.raises(ConfigError, match=r"model_index\.json: sampler\.scheduler\._target_='builtins\.open'"):
        pipe(class_labels=[0], num_inference_steps=2)
    assert not marker.exists()
