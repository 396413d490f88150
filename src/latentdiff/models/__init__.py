"""Backbones (`uvit.UViT`, `unet.UNet`, `unet.UNetCond`, `uvit2d.UVit2D`), all behind the written contract of
`contract.Backbone`; `build.build_backbone`, which also loads weights (`weights.py`); `build.check_condition`,
which compares what a backbone's `cond` is with what the data gives before training starts; `uvit_args`, the
U-ViT's argument checks, which need no torch (`train.py` runs them before heavy imports).

Every model config has a `pretrained` key (null by default) that is not a constructor argument: a weights
file (an official U-ViT `.pth` state dict, a `.safetensors` or `.pt` state dict of the backbone, or a
Lightning checkpoint of this project, whose EMA weights are taken), an export folder of `latentdiff.export`,
or, for the UNets and UVit2D, a diffusers folder.
"""
