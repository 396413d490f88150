"""Silent corruption is found: a flipped bit in a checkpoint (every loader checks the CRC-32s torch records) or in
a latent shard (`python -m latentdiff.verify`, `data.verify=true`, and every extraction re-run check the SHA-256s
recorded at write time); an extraction re-run encodes a damaged shard again.

Each test first shows the corruption is silent without the check (the file loads, one value changed)."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from latentdiff.checkpoint import verify_checkpoint
from latentdiff.data import LatentDataModule, LatentStore, StoreError
from latentdiff.errors import ConfigError
from latentdiff.extract import run_extraction
from latentdiff.train import run_training
from latentdiff.verify import main as verify_main

from ..artefacts import make_image_folder
from ..conftest import TINY_RUN, compose_config, compose_extract
from ..entries import one_line_error, snapshot


def flip_bit(path: Path, offset: int, bit: int = 3) -> None:
    """Flip one bit of a file in place (same size, same mtime order: what a failing disk does)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def tensor_offset(ckpt: Path, name_part: str = "data/") -> tuple[int, str]:
    """The file offset of the middle of the largest tensor record of a torch zip file, and the record's name."""
    with zipfile.ZipFile(ckpt) as archive:
        info = max((i for i in archive.infolist() if name_part in i.filename), key=lambda i: i.file_size)
    with open(ckpt, "rb") as f:  # the local header: 30 bytes + name + extra, then the data
        f.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), dtype="<u2")
    return info.header_offset + 30 + int(name_len) + int(extra_len) + info.file_size // 2, info.filename


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("integrity")
    return Path(
        run_training(compose_config([*TINY_RUN, "callbacks.checkpoint.every_n_train_steps=2"], root))["run_dir"]
    )


@pytest.fixture
def flipped(run, tmp_path) -> Path:
    """A copy of the run's last.ckpt with one bit flipped in the middle of its largest tensor."""
    path = tmp_path / "flipped.ckpt"
    shutil.copy(run / "last.ckpt", path)
    offset, _ = tensor_offset(path)
    flip_bit(path, offset)
    return path


def test_a_flipped_bit_in_a_checkpoint_loads_silently_without_the_check(run, flipped):
    good = torch.load(run / "last.ckpt", weights_only=True)["state_dict"]
    bad = torch.load(flipped, weights_only=True)["state_dict"]  # torch's reader does not check the CRC-32s
    changed = [k for k in good if not torch.equal(good[k], bad[k])]
    assert len({k.split(".", 1)[1] for k in changed}) == 1  # one tensor (one storage) silently altered
    assert verify_checkpoint(run / "last.ckpt") > 0
    with pytest.raises(ConfigError, match=r"is corrupt \(Bad CRC-32 for file 'archive/data/\d+'"):
        verify_checkpoint(flipped)


@pytest.mark.parametrize(
    ("entry", "args", "key"),
    [
        ("train", [*TINY_RUN, "ckpt_path={ckpt}", "trainer.max_steps=5"], "ckpt_path"),
        ("sample", ["ckpt={ckpt}", "out={tmp}/samples", "num_samples=2"], "ckpt"),
        ("export", ["ckpt={ckpt}", "out={tmp}/export"], "ckpt"),
    ],
)
def test_every_loader_refuses_a_corrupt_checkpoint(flipped, tmp_path, monkeypatch, capfd, entry, args, key):
    args = [a.format(ckpt=flipped, tmp=tmp_path) for a in args]
    if entry == "train":
        args = [f"paths.log_dir={tmp_path}/outputs", *args]
    before = snapshot(tmp_path)
    line, code = one_line_error(entry, args, tmp_path, monkeypatch, capfd)
    assert line.startswith(f"error: {key}={flipped} is corrupt (Bad CRC-32 for file"), line
    assert code == 2 and snapshot(tmp_path) == before


def test_resuming_a_run_passes_over_a_corrupt_checkpoint(run, tmp_path, caplog):
    copy = tmp_path / "run"  # compose_config's run directory
    shutil.copytree(run, copy)
    flip_bit(copy / "last.ckpt", tensor_offset(copy / "last.ckpt")[0])
    caplog.set_level("WARNING")
    result = run_training(compose_config([*TINY_RUN, f"resume={copy}", "trainer.max_steps=4"], tmp_path))
    assert result["global_step"] == 4 and "last.ckpt is corrupt" in caplog.text
    assert "continuing from the run's previous checkpoint" in caplog.text
    for name in ("last.ckpt", "step_0000002.ckpt"):  # every checkpoint corrupt: one line naming them
        flip_bit(copy / name, tensor_offset(copy / name)[0])
    with pytest.raises(ConfigError, match=r"none of the checkpoints of .* is readable and intact \(last.ckpt, step_"):
        run_training(compose_config([*TINY_RUN, f"resume={copy}", "trainer.max_steps=6"], tmp_path))


def test_verify_command_checks_a_checkpoint_and_a_run(run, flipped, capsys):
    records = verify_main([f"path={run}"])
    assert {Path(r["path"]).name for r in records} >= {"last.ckpt", "step_0000002.ckpt"}
    assert "ok: " in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        verify_main([f"path={flipped}"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: path={flipped} is corrupt"), err


# ------------------------------------------------------------------------------------------- stores
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, list[str]]:
    """A pixel store (vae=none) of 18 images in 4 shards."""
    root = tmp_path_factory.mktemp("store")
    folder = make_image_folder(root / "images")
    args = [f"data.root={folder}", "resolution=32", "vae=none", "shard_size=5", "batch_size=4", "num_workers=0"]
    run_extraction(compose_extract([*args, f"out={root / 'store'}"]))
    return root / "store", args


def _flip_shard(store: Path, shard: str = "shard-00001") -> Path:
    moments = store / "shards" / shard / "moments.npy"
    flip_bit(moments, moments.stat().st_size - 100)  # inside the data, after the header
    return moments


def test_shards_record_their_checksums(store):
    root, _ = store
    info = json.loads((root / "shards/shard-00000/index.json").read_text())
    assert set(info["sha256"]) == {"moments.npy", "labels.npy"}
    meta = json.loads((root / "store.json").read_text())
    assert sorted(meta["sha256"]) == [f"shard-0000{i}" for i in range(4)]


def test_a_flipped_bit_in_a_shard_is_found_by_verify_and_repaired_by_extraction(store, tmp_path, capsys, caplog):
    root, args = store
    copy = tmp_path / "store"
    shutil.copytree(root, copy)
    original = np.load(copy / "shards/shard-00001/moments.npy")
    damaged = _flip_shard(copy)
    assert len(LatentStore(copy)) == 18  # opens: the shapes are intact, one value is not
    assert not np.array_equal(np.load(damaged), original)

    with pytest.raises(SystemExit) as exit_info:
        verify_main([f"path={copy}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1
    assert err[0] == f"error: {damaged} is corrupt: its SHA-256 differs from the one recorded when it was written"

    cfg = compose_config(["data=latents", f"data.root={copy}", "data.image_size=32", "data.num_classes=3"])
    options = {k: cfg.data[k] for k in ("image_size", "num_classes", "latent_size", "latent_channels")}
    with pytest.raises(StoreError, match=r"data.root=.* failed verification: .*shard-00001/moments.npy is corrupt"):
        LatentDataModule(str(copy), batch_size=4, num_workers=0, verify=True, **options)
    LatentDataModule(str(copy), batch_size=4, num_workers=0, verify=False, **options)  # the option is off by default

    caplog.set_level("INFO")
    meta = run_extraction(compose_extract([*args, f"out={copy}"]))  # a re-run verifies, and re-encodes the shard
    assert meta["extraction"]["shards"] == 1 and "extracting it again" in caplog.text
    assert np.array_equal(np.load(damaged), original)
    verify_main([f"path={copy}"])
    again = run_extraction(compose_extract([*args, f"out={copy}"]))
    assert "extraction" not in again  # verified whole: nothing to do


def test_a_damaged_shard_index_or_store_record_is_found(store, tmp_path):
    root, args = store
    copy = tmp_path / "store"
    shutil.copytree(root, copy)
    index = copy / "shards/shard-00002/index.json"
    index.write_text(index.read_text().replace('"count": 5', '"count":  5'))  # same meaning, other bytes
    with pytest.raises(SystemExit):
        verify_main([f"path={copy}"])
    meta = run_extraction(compose_extract([*args, f"out={copy}"]))  # store.json is written again, verified
    assert meta["count"] == 18
    verify_main([f"path={copy}"])


def test_a_store_json_with_a_wrong_type_is_one_line(store, tmp_path):
    root, _ = store
    copy = tmp_path / "store"
    shutil.copytree(root, copy)
    meta = json.loads((copy / "store.json").read_text())
    meta["count"] = "eighteen"
    (copy / "store.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r'store.json holds count="eighteen", which is not a valid count'):
        LatentStore(copy)


def test_an_interrupted_re_extraction_still_verifies_and_a_missing_file_is_re_encoded(store, tmp_path, caplog):
    """A re-run interrupted after it found damage (store.json removed) verifies the shards again; a file a shard
    index records but that is gone is damage too (re-encoded by extraction, one line from verify)."""
    root, args = store
    copy = tmp_path / "store"
    shutil.copytree(root, copy)
    original = np.load(copy / "shards/shard-00001/moments.npy")
    _flip_shard(copy)
    (copy / "store.json").unlink()  # what an interrupted re-run leaves
    index = copy / "shards/shard-00003/index.json"  # records a file (as a text shard its captions) that is gone
    info = json.loads(index.read_text())
    info["sha256"]["captions.json"] = "0" * 64
    index.write_text(json.dumps(info))
    from latentdiff.data.store import check_shard

    with pytest.raises(StoreError, match=r"shard-00003/captions.json is missing or unreadable"):
        check_shard(copy / "shards/shard-00003", verify=True)
    caplog.set_level("INFO")
    meta = run_extraction(compose_extract([*args, f"out={copy}"]))
    assert meta["extraction"]["shards"] == 2 and meta["count"] == 18
    assert np.array_equal(np.load(copy / "shards/shard-00001/moments.npy"), original)
    verify_main([f"path={copy}"])


def test_a_checkpoint_record_torch_never_writes_is_corruption(run, tmp_path):
    """A record compressed by another method (torch writes only stored records) whose data is damaged: one line."""
    path = tmp_path / "odd.ckpt"
    shutil.copy(run / "last.ckpt", path)
    name = zipfile.ZipFile(path).namelist()[0].split("/")[0] + "/extra"
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_LZMA) as archive:
        archive.writestr(name, bytes(range(256)) * 64)
    data = bytearray(path.read_bytes())
    start = data.find(name.encode()) + len(name) + 12  # inside that record's compressed data
    data[start : start + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=rf"ckpt={path} is corrupt"):
        verify_checkpoint(path)


def test_a_stored_value_a_class_refuses_is_one_line_and_export_leaves_nothing(run, tmp_path, monkeypatch, capfd):
    ckpt = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["latentdiff"]["config"]["diffusion"]["scheduler"]["beta_schedule"] = "nope"
    crafted = tmp_path / "crafted.ckpt"
    torch.save(ckpt, crafted)
    before = snapshot(tmp_path)
    line, code = one_line_error("export", [f"ckpt={crafted}", f"out={tmp_path}/exp"], tmp_path, monkeypatch, capfd)
    assert line.startswith(f"error: ckpt={crafted}: diffusion.scheduler could not be built (NotImplementedError"), line
    assert code == 2 and snapshot(tmp_path) == before
