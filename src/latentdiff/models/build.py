"""`build_backbone` (from a model config, through the trust allow-list, with its weights) and `check_condition`."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from torch import nn

from latentdiff import trust
from latentdiff.models.contract import Backbone
from latentdiff.models.weights import load_pretrained


def build_backbone(model_cfg: DictConfig | dict, where: str = "the run config") -> nn.Module:
    """Build `model_cfg` (a `conf/model/*.yaml` node) and load `model_cfg.pretrained` when it is set.

    Backbones are built only from `latentdiff.trust.ALLOWED` (also from a checkpoint's or an export's stored
    config: `where` names that file in the error).
    """
    cfg = OmegaConf.to_container(model_cfg, resolve=True) if OmegaConf.is_config(model_cfg) else dict(model_cfg)
    pretrained = cfg.pop("pretrained", None)
    backbone = trust.build(cfg, where, "model")
    if pretrained:
        load_pretrained(backbone, pretrained)
    return backbone


def check_condition(backbone: Backbone, text: bool, num_classes: int) -> None:
    """Refuse a backbone whose condition is not what the data gives (text features, class ids or nothing).

    Args:
        backbone: a built backbone (`condition`, `class_rows`).
        text: the data gives text features (`data.text`).
        num_classes: the classes the run conditions on (`module.num_classes`; 0: labels are ignored).

    Raises:
        ValueError: one line naming the model, what it takes and what the data gives.
    """
    name = type(backbone).__name__
    gives = "text" if text else "class" if num_classes > 0 else "none"
    takes = backbone.condition
    words = {
        "text": "text features (data.text=true)",
        "class": f"class ids (module.num_classes={num_classes})",
        "none": "no condition (module.num_classes=0, data.text=false)",
    }
    if takes != gives:
        fix = {
            "text": "a text-conditional model (e.g. model=uvit_s2_t2i, unet_cond) or another store",
            "class": "a class-conditional model with the data's classes (model.num_classes, num_class_embeds)",
            "none": "an unconditional model, or data with labels or captions",
        }[gives]
        raise ValueError(
            f"model={name} takes {words[takes].split(' (')[0]} but the data gives {words[gives]}; use {fix}"
        )
    if takes == "class" and backbone.class_rows < num_classes + 1:
        raise ValueError(
            f"model={name} has {backbone.class_rows} class rows but module.num_classes={num_classes} needs "
            f"{num_classes + 1} (the classes and the null class); set the model's classes from the data"
        )
