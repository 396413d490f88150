"""Latent data: extraction (image folder and COCO captions) into a sharded store, resume, the datamodule,
training on stores with U-ViT and the UNets, and the errors of mismatched or damaged stores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import latentdiff.extract as extract_mod
from latentdiff.autoencoder import FrozenAutoencoderKL
from latentdiff.data import ImageFolderSource, LatentDataModule, LatentStore, StoreError, center_crop_arr
from latentdiff.errors import ConfigError
from latentdiff.extract import run_extraction
from latentdiff.sample import run_sampling
from latentdiff.train import run_training

from ..artefacts import TINY_VAE_FACTOR, make_coco, make_image_folder, make_tiny_clip, make_tiny_vae
from ..conftest import compose_config, compose_entry, compose_extract


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """Tiny VAE and CLIP, an image folder (19 files, one corrupt), a COCO-style set, and their stores."""
    root = tmp_path_factory.mktemp("latents")
    a = {"root": root, "vae": make_tiny_vae(root / "vae"), "clip": make_tiny_clip(root / "clip")}
    a["folder"] = make_image_folder(root / "imagenet")
    a["coco_images"], a["coco_ann"] = make_coco(root / "coco")
    a["vae_args"] = ["vae=local", f"vae.pretrained={a['vae']}", f"vae.downsample_factor={TINY_VAE_FACTOR}"]
    a["image_args"] = [
        f"data.root={a['folder']}",
        "resolution=32",
        *a["vae_args"],
        "shard_size=5",
        "batch_size=4",
        "num_workers=0",
    ]
    a["coco_args"] = [
        "data=coco_captions",
        f"data.images={a['coco_images']}",
        f"data.annotations={a['coco_ann']}",
        "resolution=32",
        *a["vae_args"],
        "text_encoder=local",
        f"text_encoder.pretrained={a['clip']}",
        "shard_size=4",
        "num_workers=0",
    ]
    a["store"] = root / "store"
    a["meta"] = run_extraction(compose_extract([*a["image_args"], f"out={a['store']}"]))
    a["coco_store"] = root / "coco_store"
    a["coco_meta"] = run_extraction(compose_extract([*a["coco_args"], f"out={a['coco_store']}"]))
    return a


def test_image_folder_store_metadata_and_skipped_file(art):
    meta = art["meta"]
    assert meta["count"] == 18 and meta["num_shards"] == 4  # 19 files, one corrupt; shards of 5
    assert meta["skipped"]["count"] == 1 and meta["skipped"]["first"][0][0].endswith("n02_square/broken_0.jpg")
    assert meta["classes"] == ["n01_circle", "n02_square", "n03_triangle"] and meta["num_classes"] == 3
    assert meta["latent_shape"] == [4, 8, 8] and meta["moments_shape"] == [2, 8, 8, 8] and meta["views"] == 2
    assert meta["vae"]["scaling_factor"] == pytest.approx(0.18215) and meta["resolution"] == 32
    assert set(meta["versions"]) >= {"torch", "diffusers"}
    store = LatentStore(art["store"])
    labels = np.concatenate([s.labels for s in store.shards])
    assert np.bincount(labels).tolist() == [6, 6, 6]  # 6 images per class; the corrupt file is not in the store


def test_stored_latents_decode_like_the_vaes_own_round_trip(art):
    ae = FrozenAutoencoderKL(str(art["vae"]))
    store = LatentStore(art["store"])
    source_index = json.loads((art["store"] / "shards/shard-00001/index.json").read_text())["source_indices"][2]
    path = ImageFolderSource(str(art["folder"]), 32).samples[source_index][0]
    x = (
        torch.from_numpy(np.array(center_crop_arr(Image.open(path).convert("RGB"), 32))).permute(2, 0, 1)[None].float()
        / 127.5
        - 1
    )
    with torch.no_grad():
        mean = ae.vae.encode(x).latent_dist.mean  # (1, 4, 8, 8)
        reference = ae.vae.decode(mean).sample  # the VAE's own encode -> decode
        reference_flip = ae.vae.decode(ae.vae.encode(x.flip(-1)).latent_dist.mean).sample
    moments = torch.from_numpy(np.array(store.shards[1].moments[2])).float()  # (2, 8, 8, 8)
    z = ae.scaling_factor * moments[:, :4]  # the posterior mean of the image and of its flip, scaled
    decoded = ae.decode(z)
    assert torch.allclose(decoded[0:1], reference, atol=2e-3)  # fp16 storage
    assert torch.allclose(decoded[1:2], reference_flip, atol=2e-3)
    assert not torch.allclose(decoded[0:1], reference_flip, atol=2e-3)


def test_extraction_resumes_after_a_crash(art, tmp_path, monkeypatch):
    out = tmp_path / "store"
    real_write, calls = extract_mod.write_shard, []

    def crash_on_third(root, index, arrays, info):
        if len(calls) == 2:
            (root / "shards" / f".tmp-shard-{index:05d}-999").mkdir()  # what a crash mid-write leaves
            raise KeyboardInterrupt
        calls.append(index)
        return real_write(root, index, arrays, info)

    monkeypatch.setattr(extract_mod, "write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_extraction(compose_extract([*art["image_args"], f"out={out}"]))
    assert not (out / "store.json").exists()
    with pytest.raises(StoreError, match="not a complete latent store .*resume it"):
        LatentStore(out)
    first_mtime = (out / "shards/shard-00000/moments.npy").stat().st_mtime_ns
    monkeypatch.setattr(extract_mod, "write_shard", real_write)
    meta = run_extraction(compose_extract([*art["image_args"], f"out={out}"]))
    assert meta["extraction"]["shards"] == 2  # only the missing shards were encoded
    assert (out / "shards/shard-00000/moments.npy").stat().st_mtime_ns == first_mtime
    assert not list((out / "shards").glob(".tmp-*"))
    resumed, straight = LatentStore(out), LatentStore(art["store"])
    for a, b in zip(resumed.shards, straight.shards):
        assert np.array_equal(a.moments, b.moments) and np.array_equal(a.labels, b.labels)
    # a complete store: a re-run does nothing; another extraction into it is refused
    assert run_extraction(compose_extract([*art["image_args"], f"out={out}"]))["count"] == 18
    with pytest.raises(ConfigError, match=r"out=.* holds another extraction \(differs in shard_size\)"):
        run_extraction(compose_extract([*art["image_args"], f"out={out}", "shard_size=7"]))


def test_two_ranks_split_the_shards_and_the_last_one_completes_the_store(art, tmp_path, monkeypatch):
    out = tmp_path / "store"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    summary = run_extraction(compose_extract([*art["image_args"], f"out={out}"]))
    assert summary["shards"] == 2 and not (out / "store.json").exists()  # shards 1 and 3
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-00001", "shard-00003"]
    monkeypatch.setenv("RANK", "0")
    meta = run_extraction(compose_extract([*art["image_args"], f"out={out}"]))
    assert meta["count"] == 18 and meta["extraction"]["shards"] == 2
    for a, b in zip(LatentStore(out).shards, LatentStore(art["store"]).shards):
        assert np.array_equal(a.moments, b.moments)


def test_coco_store_keeps_every_caption_and_the_empty_prompt(art):
    meta = art["coco_meta"]
    assert meta["count"] == 10 and meta["num_captions"] == sum(1 + i % 3 for i in range(10))
    assert meta["text"]["dim"] == 32 and meta["text"]["max_length"] == 77 and meta["num_classes"] == 0
    store = LatentStore(art["coco_store"])
    assert store.empty_text.shape == (77, 32)
    captions = store.captions(2)  # image 2 has 3 captions: "a small <shape> ...", then twice "a big <shape> ..."
    assert len(captions) == 3 and captions[0].startswith("a small ") and captions[1] == captions[2]
    from latentdiff.text import FrozenCLIPTextEncoder

    encoder = FrozenCLIPTextEncoder(str(art["clip"]))
    shard = store.shards[0]
    first, second = shard.text_offsets[1], shard.text_offsets[2]  # image 1's captions
    expected = encoder(store.captions(1)).half().numpy()
    assert second - first == 2 and np.allclose(shard.text[first:second], expected, atol=1e-3)
    assert np.allclose(store.empty_text, encoder([""])[0].half().numpy(), atol=1e-3)


def _datamodule(art, **kwargs) -> LatentDataModule:
    args = {
        "root": str(art["store"]),
        "image_size": 32,
        "num_classes": 3,
        "batch_size": 6,
        "num_workers": 0,
        "latent_size": 8,
        "latent_channels": 4,
        **kwargs,
    }
    return LatentDataModule(**args)


def test_datamodule_batches_are_stored_views_with_random_flips(art):
    dm = _datamodule(art)
    store = dm.store
    torch.manual_seed(0)
    seen_views = set()
    for batch in dm.train_dataloader():
        assert batch["moments"].shape == (6, 8, 8, 8) and batch["moments"].dtype == torch.float16
        for m, index, label in zip(batch["moments"], batch["index"], batch["cond"]):
            shard, local = store.locate(np.asarray([int(index)]))
            views = np.asarray(store.shards[shard[0]].moments[local[0]])  # (2, 8, 8, 8)
            view = [v for v in range(2) if np.array_equal(views[v], m.numpy())]
            assert view, "a batch item is not one of its stored views"
            seen_views.add(view[0])
            assert int(label) == int(store.shards[shard[0]].labels[local[0]])
    assert seen_views == {0, 1}
    ram = _datamodule(art, in_memory=True)
    assert isinstance(ram.store.shards[0].moments, np.ndarray) and not isinstance(
        ram.store.shards[0].moments, np.memmap
    )
    first = ram.val_dataloader().dataset.__getitems__([0, 1, 2])["moments"]
    assert torch.equal(first, torch.from_numpy(np.array(store.shards[0].moments[:3, 0])))  # no flip held out


def test_pickled_store_maps_its_files_again_instead_of_copying_them(art):
    import pickle

    store = LatentStore(art["store"])
    payload = pickle.dumps(store)
    assert len(payload) < 20_000  # the moments alone are 18 x 2 KiB: the arrays were not pickled
    clone = pickle.loads(payload)
    assert isinstance(clone.shards[1].moments, np.memmap)
    assert np.array_equal(clone.shards[1].moments, store.shards[1].moments)
    assert np.array_equal(clone.shards[1].labels, store.shards[1].labels)


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("uvit", ["data=latents", "data.num_classes=3", "model=uvit_tiny", "model.patch_size=2"]),
        ("unet", ["data=latents", "data.num_classes=3", "model=unet_tiny"]),
        (
            "uvit_t2i",
            [
                "data=coco256_latents",
                "data.text_dim=32",
                "model=uvit_s2_t2i",
                "model.embed_dim=32",
                "model.depth=2",
                "model.num_heads=2",
            ],
        ),
        ("unet_t2i", ["data=coco256_latents", "data.text_dim=32", "model=unet_cond_tiny"]),
    ],
)
def test_training_on_a_store(art, tmp_path, name, overrides):
    store = art["coco_store"] if "t2i" in name else art["store"]
    cfg = compose_config(
        [
            *overrides,
            f"data.root={store}",
            *art["vae_args"],
            "data.image_size=32",
            "data.batch_size=4",
            "data.num_workers=0",
            "data.num_val=8",
            "trainer.max_steps=2",
            "trainer.log_every_n_steps=1",
            "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
            "sampler.steps=2",
            "callbacks.sample_grid.samples_per_class=2",
            "callbacks.sample_grid.num_samples=4",
            "callbacks.progress_bar=null",
        ],
        tmp_path,
    )
    result = run_training(cfg)
    assert result["global_step"] == 2 and np.isfinite(result["metrics"]["val/loss"])
    run = Path(result["run_dir"])
    assert (run / "samples/step_0000002.png").is_file()
    if "t2i" in name:
        assert (run / "samples/prompts.txt").read_text().splitlines()[0].endswith("on a dark background")
        # sample.py on a text model: prompts are the store's (image, caption) pairs, recorded per index
        overrides = ["sampler.steps=2"]
        out = tmp_path / "t2i_samples"
        args = [f"ckpt={run / 'last.ckpt'}", "num_samples=5", "batch_size=2", f"out={out}", *overrides]
        result = run_sampling(compose_entry("sample", args), overrides)
        with np.load(out / "samples.npz") as npz:
            assert npz.files == ["arr_0"] and npz["arr_0"].shape == (5, 32, 32, 3)
        captions = (out / "captions.txt").read_text().splitlines()
        store = LatentStore(art["coco_store"])
        every = {c for i in range(len(store)) for c in store.captions(i)}
        assert len(captions) == 5 and set(captions) <= every and len(set(captions)) > 1
        assert result["prompts"]["captions"] == len([c for i in range(len(store)) for c in store.captions(i)])


# ---------------------------------------------------------------------------------------------- errors
def test_store_from_another_vae_or_scale_or_resolution_is_refused(art, tmp_path):
    dm = _datamodule(art)
    other = FrozenAutoencoderKL(str(make_tiny_vae(tmp_path / "other_vae", seed=1)))
    with pytest.raises(ValueError, match=r"data.root=.* was made with another VAE encoder"):
        dm.check_autoencoder(other)
    rescaled = FrozenAutoencoderKL(str(art["vae"]), scaling_factor=0.23010)
    with pytest.raises(ValueError, match=r"scaling factor 0.18215 .* set vae.scaling_factor=0.18215"):
        dm.check_autoencoder(rescaled)
    dm.check_autoencoder(FrozenAutoencoderKL(str(art["vae"]), dtype="bfloat16"))  # same encoder, other dtype
    with pytest.raises(ValueError, match=r"holds 32px latents but data.image_size=64"):
        _datamodule(art, image_size=64, latent_size=16)
    with pytest.raises(ValueError, match=r"has 3 classes but data.num_classes=1000; set data.num_classes=3"):
        _datamodule(art, num_classes=1000)
    with pytest.raises(ValueError, match=r"holds no text features but data.text=true"):
        _datamodule(art, num_classes=0, text=True)


def test_truncated_shard_is_a_clear_error_and_extraction_repairs_it(art, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(art["store"], out)
    moments = out / "shards/shard-00002/moments.npy"
    moments.write_bytes(moments.read_bytes()[:-100])
    with pytest.raises(StoreError, match=r"shard-00002/moments.npy is truncated .*re-run the extraction"):
        LatentStore(out)
    meta = run_extraction(compose_extract([*art["image_args"], f"out={out}"]))  # repairs the damaged shard
    assert meta["extraction"]["shards"] == 1 and len(LatentStore(out)) == 18


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.root={tmp}/absent"], r"data.root=.*absent does not exist"),
        (["data.root={tmp}/empty"], r"data.root=.*empty holds no (class folders|images)"),
        (["data.root={tmp}/noimages"], r"data.root=.*noimages holds no images with endings"),
        (["out={tmp}/notastore"], r"out=.*notastore is not empty and is not a latent store"),
        (
            ["data=coco_captions", "data.images={coco_images}", "data.annotations={tmp}/bad_captions.json"],
            r"data.annotations=.* names 1 images missing from data.images=.*, first: missing.jpg",
        ),
        (
            ["data=coco_captions", "data.images={coco_images}", "data.annotations={coco_ann}"],
            r"data=coco_captions needs text features: add text_encoder=clip_vit_l14",
        ),
        (["resolution=30"], r"resolution=30 is not a multiple of the VAE's downsampling factor 4"),
        (["vae.pretrained={tmp}/novae"], r"vae.pretrained=.*novae.*huggingface-cli download"),
    ],
)
def test_extraction_bad_input(art, tmp_path, overrides, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "noimages" / "cls").mkdir(parents=True)
    (tmp_path / "noimages" / "cls" / "notes.txt").write_text("x")
    (tmp_path / "notastore").mkdir()
    (tmp_path / "notastore" / "precious.txt").write_text("keep me")
    coco = json.loads(Path(art["coco_ann"]).read_text())
    coco["images"].append({"id": 999, "file_name": "missing.jpg"})
    coco["annotations"].append({"id": 9999, "image_id": 999, "caption": "nothing"})
    (tmp_path / "bad_captions.json").write_text(json.dumps(coco))
    fmt = {"tmp": tmp_path, "coco_images": art["coco_images"], "coco_ann": art["coco_ann"]}
    args = [a for a in art["image_args"] if not a.startswith("data.root")] + [f"out={tmp_path}/new_store"]
    if not any(o.startswith("data") for o in overrides):
        args.append(f"data.root={art['folder']}")
    args += [o.format(**fmt) for o in overrides]
    with pytest.raises(ConfigError, match=message):
        run_extraction(compose_extract(args))
    assert not (tmp_path / "new_store").exists()
    assert (tmp_path / "notastore" / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in (tmp_path / "notastore").iterdir()) == ["precious.txt"]


def test_training_on_an_incomplete_store_is_refused(art, tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "plan.json").write_text("{}")
    cfg = compose_config(
        ["data=latents", f"data.root={tmp_path}/half", "data.image_size=32", *art["vae_args"]], tmp_path
    )
    with pytest.raises(ConfigError, match=r"data.root=.*half is not a complete latent store \(no store.json\)"):
        run_training(cfg)
    assert not (tmp_path / "run").exists()
    cfg = compose_config(["data=imagenet_folder", f"data.root={art['folder']}"], tmp_path)
    with pytest.raises(ConfigError, match=r"is an extraction source, not training data"):
        run_training(cfg)
