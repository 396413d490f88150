"""The masked-token backbone (diffusers UVit2DModel + VQModel + AmusedScheduler): equal to diffusers and to aMUSEd's
recipe, extraction -> training -> sampling -> evaluation on tiny artefacts, checkpoint round trip, one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AmusedScheduler, UVit2DModel, VQModel
from hydra.utils import instantiate

from latentdiff.autoencoder import FrozenVQModel, same_encoder
from latentdiff.data import LatentStore, render_shapes
from latentdiff.data.latents import LatentDataset
from latentdiff.errors import ConfigError
from latentdiff.evaluate import run_evaluation
from latentdiff.export import export, load_exported
from latentdiff.extract import run_extraction
from latentdiff.models.uvit2d import UVit2D
from latentdiff.sample import run_sampling
from latentdiff.samplers.unmask import unmask_loop
from latentdiff.text import FrozenCLIPTextEncoder
from latentdiff.train import run_training

from ..artefacts import (
    TINY_VQ_CODES,
    TINY_VQ_FACTOR,
    TOKENS,
    make_coco,
    make_image_folder,
    make_inception_weights,
    make_tiny_clip,
    make_tiny_vq,
)
from ..conftest import compose_config, compose_entry, compose_extract
from ..helpers.tokens import TINY_UVIT2D

RUN = [
    "experiment=quickstart_tokens",
    "trainer.precision=32-true",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.progress_bar=null",
    "callbacks.sample_grid.every_n_steps=0",
    "callbacks.sample_grid.samples_per_class=2",
    "callbacks.checkpoint.every_n_train_steps=2",
    "sampler.steps=4",
]
SHAPES = ["data.num_train=64", "data.num_val=16", "data.batch_size=8"]


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """A tiny VQModel and CLIP (with projection), an image folder and a COCO-style set, and their token stores."""
    root = tmp_path_factory.mktemp("tokens")
    a = {"root": root, "vq": make_tiny_vq(root / "vq"), "clip": make_tiny_clip(root / "clip", projection=True)}
    a["vq_args"] = [
        "vae=vq_local",
        f"vae.pretrained={a['vq']}",
        f"vae.codebook_size={TINY_VQ_CODES}",
        f"vae.downsample_factor={TINY_VQ_FACTOR}",
        "vae.latent_channels=4",
    ]
    a["folder"] = make_image_folder(root / "images", per_class=4, corrupt=0)
    images, annotations = make_coco(root / "coco", count=8)
    common = ["resolution=32", "shard_size=8", "batch_size=8", "num_workers=0", *a["vq_args"]]
    a["labels"] = root / "labels_store"
    run_extraction(compose_extract([*common, f"data.root={a['folder']}", f"out={a['labels']}"]))
    a["text"] = root / "text_store"
    text_args = ["data=coco_captions", f"data.images={images}", f"data.annotations={annotations}"]
    text_args += ["text_encoder=local", f"text_encoder.pretrained={a['clip']}", "text_encoder.hidden_layer=-2"]
    run_extraction(compose_extract([*common, *text_args, "text_encoder.pooled=true", f"out={a['text']}"]))
    return a


def _images(count: int, seed: int = 0) -> torch.Tensor:
    images, _ = render_shapes(count, image_size=32, num_classes=4, seed=seed)
    return images.float() / 127.5 - 1.0  # (N, 3, 32, 32) in [-1, 1]


# ----------------------------------------------------------------------------------------- the pieces
def test_tokenizer_is_diffusers_vqmodel(art):
    ours = FrozenVQModel(str(art["vq"]), pixel_range=(0.0, 1.0), codebook_size=TINY_VQ_CODES)
    vq = VQModel.from_pretrained(art["vq"]).eval()
    x = _images(6)
    with torch.no_grad():
        ids = vq.quantize(vq.encode((x + 1) / 2).latents)[2][2].reshape(6, TOKENS, TOKENS)  # aMUSEd's training script
        decoded = vq.decode(ids, force_not_quantize=True, shape=(6, TOKENS, TOKENS, 4)).sample  # aMUSEd's pipeline
    assert torch.equal(ours.encode_tokens(x), ids) and ids.unique().numel() > 1
    torch.testing.assert_close(ours.decode_tokens(ids), decoded * 2 - 1)
    with pytest.raises(ValueError, match="mask token cannot be decoded"):
        ours.decode_tokens(torch.full((1, TOKENS, TOKENS), TINY_VQ_CODES))
    other = FrozenVQModel(str(make_tiny_vq(art["root"] / "vq_seed1", seed=1)))
    assert same_encoder(ours.describe(), ours.describe()) and not same_encoder(ours.describe(), other.describe())
    signed = FrozenVQModel(str(art["vq"]), pixel_range=(-1.0, 1.0))  # the same weights fed other pixel values
    assert not same_encoder(ours.describe(), signed.describe())
    with pytest.raises(ValueError, match=r"vae.codebook_size=32 does not match .* which has 64"):
        FrozenVQModel(str(art["vq"]), codebook_size=32)


def test_token_store_holds_the_tokenizers_uint16_ids(art):
    store = LatentStore(art["labels"])
    meta = store.meta
    assert meta["tokens"] == {"codebook_size": TINY_VQ_CODES, "downsample_factor": TINY_VQ_FACTOR}
    assert meta["tokens_dtype"] == "uint16" and meta["tokens_shape"] == [2, TOKENS, TOKENS]
    assert "moments_shape" not in meta
    assert store.shards[0].tokens.dtype == np.uint16 and store.shards[0].moments is None
    source = instantiate(compose_extract([f"data.root={art['folder']}", "resolution=32"]).data)
    first = source[store.locate(np.array([0]))[1][0]]  # shard 0, item 0 is source item 0
    image = torch.from_numpy(np.array(first["image"])).permute(2, 0, 1)[None].float() / 127.5 - 1
    vq = FrozenVQModel(str(art["vq"]))
    stored = torch.from_numpy(store.shards[0].tokens[0].astype(np.int64))  # (F, h, w): the image, its mirror
    assert torch.equal(stored[0], vq.encode_tokens(image)[0])
    assert torch.equal(stored[1], vq.encode_tokens(image.flip(-1))[0])
    batch = LatentDataset(store, np.arange(4), False, labels=True, text=False).__getitems__([0, 1, 2, 3])
    assert batch["tokens"].dtype == torch.int64 and batch["tokens"].shape == (4, TOKENS, TOKENS)
    assert torch.equal(batch["tokens"][0], stored[0]) and "moments" not in batch


def test_text_features_are_penultimate_states_and_the_pooled_projection(art):
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    encoder = FrozenCLIPTextEncoder(str(art["clip"]), hidden_layer=-2, pooled=True)
    feats = encoder(["a small circle", ""])  # (2, 78, 32)
    model = CLIPTextModelWithProjection.from_pretrained(art["clip"])
    tokenizer = CLIPTokenizer.from_pretrained(art["clip"])
    ids = tokenizer(["a small circle", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)  # aMUSEd's encode_prompt
    assert feats.shape == (2, 78, 32) and encoder.rows == 78
    torch.testing.assert_close(feats[:, :77], out.hidden_states[-2])
    torch.testing.assert_close(feats[:, 77], out.text_embeds)
    meta = LatentStore(art["text"]).meta["text"]
    assert meta["pooled"] is True and meta["hidden_layer"] == -2
    assert np.load(art["text"] / "empty_text.npy").shape == (78, 32)


def test_unmasking_is_the_amused_pipeline():
    from diffusers.pipelines.deprecated.amused.pipeline_amused import AmusedPipeline

    torch.manual_seed(0)
    model = UVit2D(text_conditioning=True, micro_conds=[32, 32, 0, 0, 6], **TINY_UVIT2D).eval()
    vq = VQModel(
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16), norm_num_groups=4, latent_channels=4, num_vq_embeddings=TINY_VQ_CODES,
    )  # fmt: skip
    pipe = AmusedPipeline(
        vqvae=vq, tokenizer=None, text_encoder=None, transformer=model.transformer, scheduler=AmusedScheduler(64)
    )
    pipe.set_progress_bar_config(disable=True)
    cond, null = torch.randn(1, 6, 16), torch.randn(1, 6, 16)
    for w in (1.0, 3.0):
        theirs = pipe(
            prompt_embeds=cond[:, -1], encoder_hidden_states=cond[:, :-1], negative_prompt_embeds=null[:, -1],
            negative_encoder_hidden_states=null[:, :-1], guidance_scale=w, num_inference_steps=6, height=32, width=32,
            generator=torch.Generator().manual_seed(3), output_type="latent",
        ).images  # fmt: skip
        ours = unmask_loop(
            model, AmusedScheduler(64), (1, TOKENS, TOKENS), 6, cond=cond, null_cond=null, guidance_scale=w,
            generator=[torch.Generator().manual_seed(3)],
        )  # fmt: skip
        assert torch.equal(ours, theirs) and ours.max() < TINY_VQ_CODES


# --------------------------------------------------------------------------------------------- end to end
def test_extract_train_sample_evaluate(art, tmp_path):
    data = ["data=latents", f"data.root={art['labels']}", "data.image_size=32", "data.num_classes=3"]
    data += ["data.batch_size=8", "data.num_workers=0", "data.num_val=8"]
    result = run_training(compose_config([*RUN, *art["vq_args"], *data], tmp_path))
    run = Path(result["run_dir"])
    assert result["global_step"] == 4 and math.isfinite(result["metrics"]["val/loss_ema"])
    assert (run / "samples/step_0000004.png").is_file()
    out = tmp_path / "samples"
    args = [f"ckpt={run / 'last.ckpt'}", "num_samples=8", "batch_size=3", f"out={out}", "labels=balanced"]
    made = run_sampling(compose_entry("sample", args), args)
    npz = np.load(out / "samples.npz")
    assert npz["arr_0"].shape == (8, 32, 32, 3) and npz["arr_0"].dtype == np.uint8
    assert npz["arr_1"].tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    spec = json.loads((out / "samples.json").read_text())
    assert spec["complete"] and spec["vae"]["kind"] == "VQModel" and made["sampler"]["steps"] == 4
    assert spec["sampler"]["scheduler"]["_target_"] == "diffusers.AmusedScheduler.from_config"
    again = tmp_path / "again"  # an image depends only on its index
    run_sampling(compose_entry("sample", [*args[:2], "batch_size=8", f"out={again}", "labels=balanced"]), [])
    assert np.array_equal(np.load(again / "samples.npz")["arr_0"], npz["arr_0"])
    weights = make_inception_weights(tmp_path / "inception.pth")
    reference, _ = render_shapes(16, image_size=32, seed=5)
    np.savez(tmp_path / "reference.npz", arr_0=reference.permute(0, 2, 3, 1).numpy())
    evaluate = [f"samples={out / 'samples.npz'}", f"reference={tmp_path / 'reference.npz'}", "metrics=[fid]"]
    evaluate += ["device=cpu", f"inception_weights={weights}", f"cache_dir={tmp_path / 'cache'}", "batch_size=8"]
    metrics = run_evaluation(compose_entry("evaluate", evaluate))
    assert math.isfinite(metrics["metrics"]["fid"])
    provenance = json.loads((out / "metrics.json").read_text())
    assert "AmusedScheduler" in json.dumps(provenance)


def test_text_conditional_run_samples_with_prompts(art, tmp_path):
    data = ["data=latents", f"data.root={art['text']}", "data.image_size=32", "data.text=true", "data.text_dim=32"]
    data += ["data.text_len=78", "data.batch_size=4", "data.num_workers=0", "data.num_val=4"]
    result = run_training(compose_config([*RUN, *art["vq_args"], *data, "trainer.max_steps=2"], tmp_path))
    assert result["global_step"] == 2 and math.isfinite(result["metrics"]["train/loss"])
    out = tmp_path / "samples"
    args = [f"ckpt={Path(result['run_dir']) / 'last.ckpt'}", "num_samples=4", "batch_size=4", f"out={out}"]
    run_sampling(compose_entry("sample", args), args)
    assert np.load(out / "samples.npz")["arr_0"].shape == (4, 32, 32, 3)
    assert len((out / "captions.txt").read_text().splitlines()) == 4
    with pytest.raises(ConfigError, match=r"model.pooled_text=false but data.root=.*ends with the pooled embedding"):
        run_training(compose_config([*RUN, *art["vq_args"], *data, "model.pooled_text=false"], tmp_path / "b"))


def test_checkpoint_round_trip_resumes_exactly(tmp_path):
    straight = run_training(compose_config([*RUN, *SHAPES], tmp_path / "a"))
    first = compose_config([*RUN, *SHAPES, "trainer.max_steps=2"], tmp_path / "b")
    run_training(first)
    resumed = run_training(compose_config([*RUN, *SHAPES, f"resume={first.paths.output_dir}"], tmp_path / "b"))
    assert resumed["global_step"] == straight["global_step"] == 4
    a = torch.load(Path(straight["run_dir"]) / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(Path(resumed["run_dir"]) / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and any(k.startswith("ema.model.transformer.") for k in a)
    assert not any(k.startswith("autoencoder.") for k in a)  # the VQ model is never in a checkpoint
    assert all(torch.equal(a[k], b[k]) for k in a)
    out = tmp_path / "export"  # safetensors + a diffusers UVit2DModel folder, as aMUSEd's transformer/
    export(Path(resumed["run_dir"]) / "last.ckpt", out)
    ema = {k[len("ema.model.") :]: v for k, v in a.items() if k.startswith("ema.model.")}
    assert all(torch.equal(v, ema[k]) for k, v in load_exported(out).state_dict().items())
    diffusers_model = UVit2DModel.from_pretrained(out, subfolder="transformer")
    assert all(torch.equal(v, ema[f"transformer.{k}"]) for k, v in diffusers_model.state_dict().items())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.codebook_size=128"], r"model.codebook_size=128 does not match the VQ model's codebook of 256 codes"),
        (["model.vocab_size=256"], r"model.vocab_size=256 is too small for model.codebook_size=256 .* >= 257"),
        (["sampler=ddim"], r"scheduler=DDIMScheduler cannot sample a masked-token model .*; use sampler=amused"),
        (["diffusion=linear", "sampler=ddim"], r"masked-token run needs .*; diffusion is not set for one"),
        (["diffusion.scheduler.mask_token_id=3"], r"mask_token_id=3 is not the model's mask id .* = 256"),
        (["vae=none"], r"model.codebook_size=null: UVit2D reads the token ids of a VQ model"),
    ],
)
def test_config_mistakes_are_one_line_errors(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message) as err:
        run_training(compose_config([*RUN, *SHAPES, *overrides], tmp_path))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_token_store_needs_its_own_vq_model(art, tmp_path):
    data = ["data=latents", f"data.root={art['labels']}", "data.image_size=32", "data.num_classes=3"]
    data.append("data.batch_size=4")
    with pytest.raises(ConfigError, match=r"holds ids of a 64-code codebook but the run's VQ model has 256"):
        run_training(compose_config([*RUN, *data], tmp_path))  # vq_tiny: another tokenizer
    diffusion = ["model=uvit_tiny", "vae=none", "diffusion=linear", "sampler=ddim", "data.latent_channels=3"]
    with pytest.raises(ConfigError, match=r"holds 8x8 VQ token ids but the run expects 32x32 .* use the store's VQ"):
        run_training(compose_config([*RUN, *data, *diffusion], tmp_path))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+sampler.step_kwargs.eta=0.5", r"sampler.step_kwargs.eta is not an option of the masked-token sampler"),
        ("sampler.guidance_interval=[0,5]", r"sampler.guidance_interval is not supported by the masked-token"),
        ("+callbacks.sample_grid.step_kwargs.eta=1", r"callbacks.sample_grid.step_kwargs.eta is not an option of"),
    ],
)
def test_unmasking_options_are_checked_before_training(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        run_training(compose_config([*RUN, *SHAPES, override], tmp_path))
    assert not (tmp_path / "run").exists()
