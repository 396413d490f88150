"""The diffusers classes of an export folder (`latentdiff.export`): what plain diffusers calls load.

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("<export>", trust_remote_code=True)
    images = pipe(class_labels=[0, 1, 2, 3], seed=0).images          # PIL images, as `sample.py` draws them

- `LatentdiffPipeline`: the export's pipeline where diffusers has none that samples it as this project does
  (U-ViT, SiT, LightningDiT, the UNets with class labels, pixel-space runs). It is `sample.py`'s sampler
  (`samplers.image.ImageSampler`) over the components diffusers loaded: the same sample index and seed give the
  same image as `sample.py ... seed=<seed>`.
- `LatentdiffBackbone`: a backbone that diffusers has no class for, as a diffusers model (`ModelMixin`); its
  `config.json` holds the model config, which is built only from `latentdiff.trust.ALLOWED`.

The folder ships two one-line files that import these classes (`pipeline_latentdiff.py`,
`<component>/latentdiff_backbone.py`): that is how diffusers finds code that is not its own, hence
`trust_remote_code=True`; as shipped, the code that runs is the installed latentdiff (diffusers runs whatever
those files hold: read them in a folder from someone else before passing `trust_remote_code=True`). latentdiff's
own loaders (`model.pretrained=<export>`, `load_exported`) never run those files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import PIL.Image
import torch
from diffusers import ConfigMixin, DiffusionPipeline, ImagePipelineOutput, ModelMixin
from diffusers.configuration_utils import register_to_config

from latentdiff.autoencoder import Autoencoder
from latentdiff.latent_norm import vae_latents
from latentdiff.models.build import build_backbone
from latentdiff.models.contract import BACKBONE_CLASS, BACKBONE_MODULE, Backbone
from latentdiff.samplers.cfg import null_condition
from latentdiff.samplers.image import ImageSampler
from latentdiff.trust import build

PIPELINE_MODULE = "pipeline_latentdiff"  # the root file through which diffusers imports `LatentdiffPipeline`


def ship_pipeline_code(folder: Path, index: dict[str, Any]) -> None:
    """Make `folder` (with `index`, its `model_index.json` record) a `LatentdiffPipeline` folder that
    `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads: the class names and the one-line
    files through which diffusers imports this module's classes; writes `model_index.json`."""
    index["_class_name"] = [PIPELINE_MODULE, "LatentdiffPipeline"]
    (folder / f"{PIPELINE_MODULE}.py").write_text(f"from {__name__} import LatentdiffPipeline  # noqa: F401\n")
    for name, entry in index.items():
        if isinstance(entry, list) and len(entry) == 2 and entry[1] == BACKBONE_CLASS:
            index[name] = [BACKBONE_MODULE, BACKBONE_CLASS]
            stub = f"from {__name__} import {BACKBONE_CLASS}  # noqa: F401\n"
            (folder / name / f"{BACKBONE_MODULE}.py").write_text(stub)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


class LatentdiffBackbone(ModelMixin, ConfigMixin):
    """A latentdiff backbone as a diffusers model: `forward(x, timesteps, cond)` as `contract.Backbone`'s.

    Args:
        model: the model config of the run (`conf/model/*.yaml`, resolved; its `_target_` from the allow-list).
    """

    @register_to_config
    def __init__(self, model: dict[str, Any]):
        super().__init__()
        self.backbone = build_backbone(dict(model, pretrained=None), "the export's config.json")

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.backbone(x, timesteps, cond)


class _ExportedVAE(Autoencoder):
    """The export's diffusers `AutoencoderKL` as this project's decoder: its config's `scaling_factor` (and
    channel-wise `latents_mean`, `latents_std`) are the run's (`autoencoder.FrozenAutoencoderKL`)."""

    def __init__(self, vae: Any):
        super().__init__()
        self.vae = vae

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        config, stats = self.vae.config, {}
        if config.latents_mean is not None:
            as_channels = lambda v: torch.tensor(v, device=latents.device).view(1, -1, 1, 1)
            stats = {"shift": as_channels(config.latents_mean), "scale": as_channels(config.latents_std)}
        z = vae_latents(latents, config.scaling_factor, **stats)
        return self.vae.decode(z.to(self.vae.dtype)).sample.float()


class LatentdiffPipeline(DiffusionPipeline):
    """`sample.py`'s sampling of an exported run, as a diffusers pipeline.

    Args:
        scheduler: the training noise schedule (the sampler is built from its config, as `sample.py` does).
        transformer, unet: the backbone (one of them): a `LatentdiffBackbone`, or the diffusers UNet it wraps.
        vae: the run's `AutoencoderKL` (its `scaling_factor` the run's); None for pixel-space runs.
        sampling: what the sampler needs of the run: `model`, `vae` (pixel runs), `sampler`, `latent_shape`,
            `num_classes` (written by `latentdiff.export`).
    """

    _optional_components: ClassVar[list[str]] = ["transformer", "unet", "vae"]
    # no model_cpu_offload_seq: the sampler calls the backbone inside its component, past accelerate's hooks

    def __init__(
        self,
        scheduler: Any,
        transformer: Any = None,
        unet: Any = None,
        vae: Any = None,
        sampling: dict[str, Any] | None = None,
    ):
        super().__init__()
        if (transformer is None) == (unet is None):
            raise ValueError("LatentdiffPipeline takes one backbone: transformer or unet")
        if not sampling:
            raise ValueError("LatentdiffPipeline needs the `sampling` record that latentdiff.export writes")
        self.register_modules(scheduler=scheduler, transformer=transformer, unet=unet, vae=vae)
        self.register_to_config(sampling=sampling)

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """diffusers' `save_pretrained`, then the class names and one-line files that let `DiffusionPipeline`
        load the folder again (diffusers writes this class's name as a plain string and copies no code)."""
        super().save_pretrained(save_directory, **kwargs)
        folder = Path(save_directory)
        ship_pipeline_code(folder, json.loads((folder / "model_index.json").read_text()))

    def _backbone(self) -> Backbone:
        """This project's backbone over the loaded component (its weights shared, not copied)."""
        net = self.transformer if self.transformer is not None else self.unet
        if isinstance(net, LatentdiffBackbone):
            return net.backbone
        with torch.device("meta"):  # the wrapper only: its network is the loaded component
            backbone = build_backbone(dict(self.config.sampling["model"], pretrained=None), "model_index.json")
        backbone.wrap_exported(net)
        return backbone

    def _autoencoder(self) -> Autoencoder:
        if self.vae is not None:
            return _ExportedVAE(self.vae)
        return build(self.config.sampling["vae"], "model_index.json", "vae")

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | torch.Tensor | None = None,
        num_images: int | None = None,
        seed: int = 0,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Images of sample indices 0..B-1 (B: `len(class_labels)`, else `num_images`).

        Args:
            class_labels: class ids of a class-conditional run (one per image); None for unconditional runs.
            seed: the seed of `sample.py` (`samplers.seeds`): each image's noise follows from it and its index.
            num_inference_steps, guidance_scale: the run's sampler's when None.
            output_type: "pil", "np" ((B, H, W, 3) uint8) or "pt" ((B, 3, H, W) float in [0, 1]).
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type={output_type!r}: use 'pil', 'np' or 'pt'")
        sampling = self.config.sampling
        num_classes = int(sampling["num_classes"])
        if (class_labels is None) != (num_classes == 0):
            wanted = f"class_labels (ids below {num_classes})" if num_classes else "no class_labels"
            raise ValueError(f"this run takes {wanted}")
        backbone = self._backbone()
        weight = next(backbone.parameters())
        if weight.dtype != torch.float32:
            raise ValueError(
                f"LatentdiffPipeline samples float32 weights (got {weight.dtype}), as sample.py does: load it "
                "without a dtype; sample.py precision=bf16-mixed autocasts instead"
            )
        device = weight.device
        cond = None
        if class_labels is not None:
            cond = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
            if cond.numel() and (cond.min() < 0 or cond.max() >= num_classes):
                raise ValueError(f"class_labels must be ids in [0, {num_classes}); got {cond.tolist()}")
            num_images = cond.numel()
        if not num_images:
            raise ValueError("give class_labels or num_images")
        sampler_cfg = sampling["sampler"]
        sampler = ImageSampler(
            backbone,
            self._autoencoder().to(device),
            self.scheduler,
            build(sampler_cfg["scheduler"], "model_index.json", "sampler.scheduler"),
            num_inference_steps or sampler_cfg["steps"],
            sampling["latent_shape"],
            lambda c: null_condition(c, num_classes),
            guidance_scale=sampler_cfg["guidance_scale"] if guidance_scale is None else guidance_scale,
            guidance_interval=sampler_cfg.get("guidance_interval"),
            step_kwargs=sampler_cfg.get("step_kwargs") or {},
            seed=seed,
        )
        images = sampler.images(list(range(int(num_images))), cond)  # (B, H, W, 3) uint8
        if output_type == "pt":
            images = images.permute(0, 3, 1, 2).float() / 255
        else:
            images = images.numpy()
            if output_type == "pil":
                images = [PIL.Image.fromarray(image) for image in images]
        return ImagePipelineOutput(images=images) if return_dict else (images,)
