"""Image sources for extraction: an ImageFolder tree (ImageNet `train/<wnid>/*.JPEG`) and COCO captions.

A source lists its items once, deterministically (sorted), so a resumed or multi-rank extraction assigns
the same items to the same shards. Reading an item never raises: an unreadable file comes back with
`image=None` and the reason, and the extraction reports it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop (guided-diffusion, used by DiT and U-ViT): box-halve while the short side is at
    least 2x the target, bicubic-resize the short side to `size`, crop the centre.

    Returns:
        (size, size, 3) uint8.
    """
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def _read(path: str, size: int) -> tuple[np.ndarray | None, str | None]:
    try:
        with Image.open(path) as im:
            return center_crop_arr(im.convert("RGB"), size), None
    except Exception as err:  # any decoder failure is a skipped image, reported at the end
        return None, f"{err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _digest(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


class ImageFolderSource:
    """Images in `root/<class>/<file>` with labels from the sorted class folder names.

    Args:
        root: the folder of class folders.
        resolution: side of the square crop (pixels).
        extensions: accepted file endings (case-insensitive).
    """

    kind = "image_folder"

    def __init__(self, root: str, resolution: int = 256, extensions: list[str] | None = None):
        self.root, self.resolution = Path(root), int(resolution)
        if self.resolution < 8:
            raise ValueError(f"resolution={resolution} is too small; use 8 or more (e.g. 256 or 512)")
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root={root} does not exist or is not a folder")
        exts = tuple(e.lower() for e in (extensions or IMG_EXTENSIONS))
        try:
            self.classes, class_to_idx = find_classes(str(self.root))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"data.root={root} holds no class folders (expected root/<class>/<image>)"
            ) from None
        self.samples = make_dataset(str(self.root), class_to_idx, extensions=exts, allow_empty=True)
        if not self.samples:
            raise FileNotFoundError(f"data.root={root} holds no images with endings {', '.join(exts)}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.samples[index]
        image, error = _read(path, self.resolution)
        return {"image": image, "label": label, "path": path, "error": error, "index": index}

    def describe(self) -> dict[str, Any]:
        """What identifies this source in the store's plan and metadata."""
        rel = [str(Path(p).relative_to(self.root)) for p, _ in self.samples]
        return {
            "kind": self.kind,
            "root": str(self.root.resolve()),
            "resolution": self.resolution,
            "count": len(self),
            "files_sha256": _digest(rel),
            "classes": self.classes,
        }


class CocoCaptionsSource:
    """MS-COCO images with all their captions (`captions_train2014.json` layout).

    Items are the images that have at least one caption, in image-id order. An annotations file that names
    images missing from `images` is an error (the count and the first few names are reported).

    Args:
        images: folder of the image files (e.g. train2014/).
        annotations: the captions JSON (`images` with `id`/`file_name`, `annotations` with `image_id`/`caption`).
        resolution: side of the square crop (pixels).
    """

    kind = "coco_captions"
    classes: list[str] | None = None

    def __init__(self, images: str, annotations: str, resolution: int = 256):
        self.images, self.annotations, self.resolution = Path(images), Path(annotations), int(resolution)
        if not self.images.is_dir():
            raise FileNotFoundError(f"data.images={images} does not exist or is not a folder")
        if not self.annotations.is_file():
            raise FileNotFoundError(f"data.annotations={annotations} does not exist")
        try:
            coco = json.loads(self.annotations.read_text())
            files = {int(im["id"]): im["file_name"] for im in coco["images"]}
            captions: dict[int, list[str]] = {}
            for ann in coco["annotations"]:
                captions.setdefault(int(ann["image_id"]), []).append(str(ann["caption"]).strip())
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(
                f"data.annotations={annotations} is not a COCO captions file ({err.__class__.__name__}: {err})"
            ) from None
        unknown = sorted(set(captions) - set(files))
        if unknown:
            raise ValueError(
                f"data.annotations={annotations}: captions refer to {len(unknown)} unknown image ids, "
                f"first {unknown[:3]}"
            )
        self.items = [(i, files[i], captions[i]) for i in sorted(captions)]
        if not self.items:
            raise ValueError(f"data.annotations={annotations} holds no captions")
        present = {p.name for p in self.images.iterdir()}
        missing = [name for _, name, _ in self.items if name not in present]
        if missing:
            raise FileNotFoundError(
                f"data.annotations={annotations} names {len(missing)} images missing from data.images={images}, "
                f"first: {', '.join(missing[:3])}"
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id, name, captions = self.items[index]
        path = str(self.images / name)
        image, error = _read(path, self.resolution)
        return {"image": image, "label": image_id, "captions": captions, "path": path, "error": error, "index": index}

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "images": str(self.images.resolve()),
            "annotations": str(self.annotations.resolve()),
            "resolution": self.resolution,
            "count": len(self),
            "files_sha256": _digest([f"{i}:{n}:{len(c)}" for i, n, c in self.items]),
        }
