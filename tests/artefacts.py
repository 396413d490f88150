"""Tiny real artefacts for offline tests: an AutoencoderKL, a CLIP text model + tokenizer, image folders and
a COCO-style captions file. They are built with the real classes and saved with `save_pretrained`, so the
code under test loads them through the path users take with the real hub weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentdiff.data import render_shapes

TINY_VAE_FACTOR = 4  # three encoder blocks: 32px images -> 8x8x4 latents


def make_tiny_vae(path: Path, seed: int = 0) -> Path:
    """A 3-block AutoencoderKL (downsampling 4, 4 latent channels) with random weights, saved to `path`."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    vae.save_pretrained(path)
    return path


TINY_VQ_FACTOR = 4  # three encoder blocks: 32px images -> 8x8 token ids
TINY_VQ_CODES = 64
TOKENS = 8  # the token grid side of the tiny VQ: 32px images / downsampling 4


def make_tiny_vq(path: Path, seed: int = 0, codes: int = TINY_VQ_CODES) -> Path:
    """A 3-block VQModel (downsampling 4, `codes` codebook vectors of width 4; it looks ids up in its codebook
    when decoding, as aMUSEd's VQ-GAN) with random weights, saved to `path`."""
    from diffusers import VQModel

    torch.manual_seed(seed)
    vq = VQModel(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        num_vq_embeddings=codes,
        norm_num_groups=4,
        sample_size=32,
        lookup_from_codebook=True,
    )
    vq.save_pretrained(path)
    return path


def make_tiny_clip(path: Path, hidden: int = 32, seed: int = 0, projection: bool = False) -> Path:
    """A 2-layer CLIPTextModel (width `hidden`, 77 positions) and a byte-level CLIPTokenizer, saved to `path`;
    `projection`: a CLIPTextModelWithProjection (pooled projection of width `hidden`, as aMUSEd's)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    # the byte -> printable character table of GPT-2 / CLIP byte-level BPE, one token per character
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    chars = [chr(c) for c in printable] + [chr(256 + i) for i in range(len(extra))]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        projection_dim=hidden,
    )
    (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).save_pretrained(path)
    return path


def _images(count: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, 3) uint8 shapes images of varied sizes (not square: the centre crop has work to do)."""
    images, labels = render_shapes(count, image_size=size, num_classes=3, seed=seed)
    return images.permute(0, 2, 3, 1).numpy(), labels.numpy()


def make_image_folder(root: Path, per_class: int = 6, size: int = 48, corrupt: int = 1, seed: int = 0) -> Path:
    """root/<class>/<n>.{png,jpg}: 3 classes, PNG and JPEG mixed, images wider than tall, plus `corrupt`
    files with an image ending that hold no image. Returns `root`."""
    images, _ = _images(3 * per_class, size, seed)
    for c, name in enumerate(("n01_circle", "n02_square", "n03_triangle")):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            wide = np.concatenate([images[c * per_class + i], images[c * per_class + i][:, : size // 4]], axis=1)
            ext = "png" if i % 2 else "jpg"
            Image.fromarray(wide).save(folder / f"img_{i:03d}.{ext}")
    for i in range(corrupt):
        (root / "n02_square" / f"broken_{i}.jpg").write_bytes(b"not an image at all")
    return root


def make_coco(root: Path, count: int = 10, size: int = 48, seed: int = 1) -> tuple[Path, Path]:
    """A COCO-style captions file and its image folder: `count` images with 1-3 captions each.

    Returns:
        (images folder, annotations JSON).
    """
    images, labels = _images(count, size, seed)
    folder = root / "train2014"
    folder.mkdir(parents=True, exist_ok=True)
    names = ("circle", "square", "triangle")
    coco = {"images": [], "annotations": []}
    for i in range(count):
        file_name = f"COCO_train2014_{i:012d}.jpg"
        Image.fromarray(images[i]).save(folder / file_name)
        coco["images"].append({"id": 100 + i, "file_name": file_name, "height": size, "width": size})
        for j in range(1 + i % 3):
            caption = f"a {'big' if j else 'small'} {names[labels[i]]} on a dark background"
            coco["annotations"].append({"id": 1000 + 10 * i + j, "image_id": 100 + i, "caption": caption})
    annotations = root / "captions_train2014.json"
    annotations.write_text(json.dumps(coco))
    return folder, annotations


def make_inception_weights(path: Path, seed: int = 0) -> Path:
    """torch-fidelity's Inception-v3 with random weights, saved as a state dict in its release format.

    The module is built with its own constructor (the download is patched out), so the keys and shapes
    are exactly those torch-fidelity loads.
    """
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as fe

    torch.manual_seed(seed)
    with (
        mock.patch.object(fe, "load_state_dict_from_url", return_value=None),
        mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", return_value=None),
    ):
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    # random weights collapse every image to the same features; calibrating BatchNorm on varied images (as
    # training would) keeps the activations normalised, so features and logits differ from image to image
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batches
    model.train()
    images, _ = render_shapes(32, seed=seed + 100)
    with torch.no_grad():
        model(images)
    model.eval()
    model.fc.weight.data *= 40  # peaked class probabilities: an Inception Score well above 1
    state = model.state_dict()
    torch.save(state, path)
    return path
