"""`torch.compile` of a backbone (`module.compile`): the whole training forward, or each repeated block in place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

SCOPES = ("model", "blocks")


def compile_backbone(backbone: nn.Module, options: bool | dict) -> Callable:
    """Compile `backbone` as `module.compile` says; returns the callable of its training forward.

    Args:
        backbone: the trained network.
        options: True, or a dict of `torch.compile` kwargs with an optional `scope`: "model" (default: the
            training forward as one graph; sampling stays eager) or "blocks" (each block compiled in place, for
            training and sampling: shorter compile times, see `compile_regions`).
    """
    kwargs = dict(options) if isinstance(options, dict) else {}
    scope = kwargs.pop("scope", "model")
    if scope == "model":
        return torch.compile(backbone, **kwargs)
    if scope == "blocks":
        compile_blocks(backbone, **kwargs)
        return backbone
    raise ValueError(f"module.compile.scope={scope!r} is not allowed; use one of {', '.join(map(repr, SCOPES))}")


def compile_regions(backbone: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a backbone, each compiled on its own by `module.compile.scope=blocks`.

    The items of every `nn.ModuleList` and every `mid_block`, found from the top down without entering a
    block: U-ViT's in-blocks, mid block and out-blocks; a diffusers UNet's down, mid and up blocks.
    """
    regions: list[nn.Module] = []
    for name, child in backbone.named_children():
        if isinstance(child, nn.ModuleList):
            regions.extend(child)
        elif name == "mid_block" and child is not None:
            regions.append(child)
        else:
            regions.extend(compile_regions(child))
    return regions


def compile_blocks(backbone: nn.Module, **options: Any) -> list[nn.Module]:
    """`torch.compile` each of `compile_regions(backbone)` in place (state-dict keys do not change); returns them.

    Every block is its own compiled frame: dynamo's recompile limit (8 per code object) is raised to twice the
    number of blocks, or the blocks past the limit would silently run eager.
    """
    regions = compile_regions(backbone)
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 2 * len(regions))
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * config.recompile_limit)
    for region in regions:
        region.compile(**options)
    return regions
