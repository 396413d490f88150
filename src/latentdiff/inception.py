"""torch-fidelity's Inception-v3 (the TF-FID port) and its weights file, read without running code.

Weights: torch-fidelity's release file, downloaded once into torch's hub cache, or a local file
(`inception_weights=<file>`); offline without it, the error names the URL and the option. torch-fidelity
reads weights with `weights_only=False`; it is handed only the tensors read here with `weights_only=True`.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.utils import create_feature_extractor

from latentdiff.checkpoint import read_torch_file
from latentdiff.data.store import sha256_file
from latentdiff.errors import ConfigError

FEATURE_EXTRACTOR = "inception-v3-compat"
FID_LAYER, ISC_LAYER = "2048", "logits_unbiased"  # torch-fidelity's default layers for these metrics


def inception_weights_file(weights: str | None, key: str = "inception_weights") -> Path:
    """The Inception weights file: `weights`, or torch-fidelity's release file in torch's hub cache (downloaded
    on first use). Raises a one-line FileNotFoundError naming the URL and the option when it cannot be had."""
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{key}={weights} does not exist; download {URL_INCEPTION_V3} and set {key}=<file>")
        return path
    path = Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[-1]
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(URL_INCEPTION_V3, str(path), progress=False)
        except Exception as err:
            path.unlink(missing_ok=True)
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise FileNotFoundError(
                f"the Inception weights could not be downloaded from {URL_INCEPTION_V3} ({first}); "
                f"download that file on a machine with internet and set {key}=<file>"
            ) from None
    return path


def _safe_weights(path: Path) -> io.BytesIO:
    """The Inception state dict of `path`, read with `weights_only=True`, as an in-memory torch file.

    torch-fidelity reads its weights with `torch.load(..., weights_only=False)`, which runs whatever a crafted
    pickle asks for; it is given this buffer instead, which holds only the tensors we read safely.

    Raises:
        ConfigError: the file cannot be read safely, or holds no state dict of tensors.
    """
    state = read_torch_file(path, "inception_weights", what="torch weights file")
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(
            f"inception_weights={path} holds no state dict of tensors; use torch-fidelity's {URL_INCEPTION_V3}"
        )
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    buffer.seek(0)
    return buffer


class Inception:
    """torch-fidelity's Inception-v3 feature extractor (pool3 2048-d features and unbiased logits).

    Args:
        weights: a local weights file in torch-fidelity's format; None: torch-fidelity's release file.
        device: where it runs.
        batch_size: images per forward.
    """

    def __init__(self, weights: str | None = None, device: str | torch.device = "cpu", batch_size: int = 64):
        self.weights_file = inception_weights_file(weights)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # torch-fidelity's .cuda() uses the current device
        try:
            self.model = create_feature_extractor(
                FEATURE_EXTRACTOR,
                [FID_LAYER, ISC_LAYER],
                cuda=self.device.type == "cuda",
                feature_extractor_weights_path=_safe_weights(self.weights_file),
                verbose=False,
            )
        except RuntimeError as err:  # a state dict of another network
            first = str(err).splitlines()[0]
            raise ValueError(
                f"inception_weights={self.weights_file} is not torch-fidelity's Inception: {first}"
            ) from None
        self._sha256: str | None = None

    def describe(self) -> dict[str, str]:
        if self._sha256 is None:
            self._sha256 = sha256_file(self.weights_file)
        return {"feature_extractor": FEATURE_EXTRACTOR, "weights": str(self.weights_file), "sha256": self._sha256}

    @torch.no_grad()
    def features(
        self, batches: Iterator[np.ndarray | torch.Tensor], total: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Features of uint8 NHWC batches: {"2048": (N, 2048), "logits_unbiased": (N, 1008)} float32 CPU."""
        from tqdm import tqdm

        out: dict[str, list[torch.Tensor]] = {FID_LAYER: [], ISC_LAYER: []}
        with tqdm(total=total, desc="inception", unit="img", disable=None, leave=False) as bar:
            for batch in batches:
                batch = batch if torch.is_tensor(batch) else torch.from_numpy(np.array(batch))  # a writable copy
                for start in range(0, len(batch), self.batch_size):
                    x = batch[start : start + self.batch_size].permute(0, 3, 1, 2).contiguous().to(self.device)
                    feats = self.model.convert_features_tuple_to_dict(self.model(x))
                    for k in out:
                        out[k].append(feats[k].float().cpu())
                    bar.update(len(x))
        return {k: torch.cat(v) if v else torch.zeros(0) for k, v in out.items()}
