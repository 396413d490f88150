"""The one sampler/objective compatibility check, on built objects and on a composed config.

Each objective says which diffusers sampling schedulers fit it (`Objective.sampler_problem`); the sampler names
offered in an error are the presets of `conf/sampler/` whose scheduler fits, so a new preset needs no list here.
A masked-token run's unmasking options are checked here too (`samplers.unmask.check_unmask_options`), for the
run's sampler and for every callback that samples.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from diffusers.schedulers.scheduling_utils import SchedulerMixin
from omegaconf import OmegaConf

from latentdiff.errors import ConfigError
from latentdiff.models.dit_args import check_dit_objective
from latentdiff.objectives import OBJECTIVES, Objective, objective_for
from latentdiff.objectives.variance import LEARNED_VARIANCE
from latentdiff.renames import canonical_target
from latentdiff.samplers.unmask import check_unmask_options

# what checks a sampler's `step_kwargs` and `guidance_interval`, by the objective's input kind (None: the
# diffusers scheduler's own `step` takes them)
OPTION_CHECKS: dict[str, Callable[..., None]] = {"tokens": check_unmask_options}


def check_fits(
    objective: type[Objective], scheduler_class: type, train_config: Mapping[str, Any], key: str = "sampler.scheduler"
) -> None:
    """Raise one line when `scheduler_class` cannot sample a model trained with `objective`.

    Args:
        objective: the objective class of the run.
        scheduler_class: the diffusers class of the sampling scheduler.
        train_config: the training scheduler's config (`diffusion.scheduler`).
        key: the sampler's config key, for the message.

    Raises:
        ValueError: naming the sampler, what it cannot do, and the `conf/sampler` presets that fit.
    """
    problem = objective.sampler_problem(scheduler_class, train_config)
    if problem is None:
        return
    names = samplers_for(objective, train_config)
    others = [o.kind for o in OBJECTIVES if o is not objective and o.takes_sampler(scheduler_class)]
    hint = f" ({scheduler_class.__name__} samples {others[0]} models)" if others else ""
    raise ValueError(f"{key}={scheduler_class.__name__} {problem}; use sampler={_or(names)}{hint}")


def make_sampling_scheduler(scheduler_partial: Callable[..., SchedulerMixin], train_scheduler: Any) -> SchedulerMixin:
    """A sampling scheduler (DDIM, DPM-Solver++, Euler, ...) sharing the training schedule's config.

    `scheduler_partial` is e.g. `functools.partial(DDIMScheduler.from_config, timestep_spacing="trailing")`,
    as Hydra builds it from `conf/sampler/*.yaml`.

    Raises:
        ValueError: the sampler cannot follow the training objective (`check_fits`).
    """
    objective = objective_for(train_scheduler)
    made_by = _made_by(scheduler_partial)
    if made_by is not None:  # before building: another objective's config may not build this scheduler at all
        check_fits(objective, made_by, train_scheduler.config)
    scheduler = scheduler_partial(train_scheduler.config)
    if made_by is None:
        check_fits(objective, type(scheduler), train_scheduler.config)
    return scheduler


def _made_by(scheduler_partial: Callable) -> type | None:
    """The class whose `from_config` a (partial of a) classmethod is, else None."""
    fn = scheduler_partial.func if isinstance(scheduler_partial, functools.partial) else scheduler_partial
    owner = getattr(fn, "__self__", None)
    return owner if isinstance(owner, type) else None


def check_sampler_fits(cfg: Any, sampler_key: str = "sampler.scheduler") -> None:
    """`check_fits` on a composed config (before anything is built), then the objective's own numbers
    (`Objective.check_config`) and the options of every sampler of the run (`OPTION_CHECKS`).

    A `_target_` that cannot be imported is left to `signatures.check_targets`, which names it.

    Raises:
        ConfigError: one line naming the key, the value and what is allowed.
    """
    objective = _objective_class(OmegaConf.select(cfg, "diffusion._target_", default=None))
    scheduler = scheduler_class(OmegaConf.select(cfg, f"{sampler_key}._target_", default=None))
    if objective is None or scheduler is None:
        return
    try:
        check_fits(objective, scheduler, OmegaConf.select(cfg, "diffusion.scheduler", default=None) or {}, sampler_key)
        check_variance(cfg, sampler_key)
        if canonical_target(OmegaConf.select(cfg, "model._target_", default="")) == "latentdiff.models.dit.DiT":
            steps = OmegaConf.select(cfg, "diffusion.scheduler.num_train_timesteps", default=None) or 1000
            check_dit_objective(OmegaConf.select(cfg, "model"), objective.kind, steps)
        objective.check_config(cfg)
        check_options = OPTION_CHECKS.get(objective.input_kind)
        if check_options is not None:
            samplers = {"sampler": OmegaConf.select(cfg, "sampler", default=None)}
            callbacks = OmegaConf.select(cfg, "callbacks", default=None) or {}
            samplers.update({f"callbacks.{k}": v for k, v in callbacks.items() if v and "step_kwargs" in v})
            for key, sampler in samplers.items():
                if sampler is not None:
                    check_options(sampler.get("step_kwargs") or {}, sampler.get("guidance_interval"), key)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_variance(cfg: Any, sampler_key: str = "sampler.scheduler") -> None:
    """Refuse a sampler that reads a learned variance (`variance_type=learned_range`) for a backbone that learns
    none, and diffusers' `learned`, which reads the variance itself (the backbones learn Improved DDPM's range).

    Raises:
        ValueError: naming the key, the value and what to set.
    """
    variance = OmegaConf.select(cfg, f"{sampler_key}.variance_type", default=None)
    if variance == "learned":
        raise ValueError(
            f"{sampler_key}.variance_type=learned reads the variance itself, but a backbone learns Improved DDPM's "
            "interpolation between the variance bounds; use learned_range (sampler=ddpm_learned)"
        )
    target = str(OmegaConf.select(cfg, f"{sampler_key}._target_", default="") or "")
    if variance in LEARNED_VARIANCE and not target.startswith("diffusers.DDPMScheduler"):
        raise ValueError(
            f"{sampler_key}.variance_type={variance} is read by DDPM's step only, not by {target or 'this sampler'}; "
            "use sampler=ddpm_learned, or drop the variance_type (every other sampler uses the mean)"
        )
    model = OmegaConf.select(cfg, "model", default=None) or {}
    learns = bool(model.get("learn_sigma")) and model.get("time_convention", "dit") != "sit"
    if variance in LEARNED_VARIANCE and not learns:
        raise ValueError(
            f"{sampler_key}.variance_type={variance} reads a learned variance, but the backbone learns none; "
            "use a DiT with model.learn_sigma=true (and DDPM time), or another sampler (sampler=ddpm, ddim, dpm_solver)"
        )


def conf_samplers() -> dict[str, type]:
    """The presets of `conf/sampler/` and their diffusers scheduler classes (those that can be imported)."""
    import yaml

    from latentdiff.config import CONF_DIR

    found = {}
    for path in sorted((CONF_DIR / "sampler").glob("*.yaml")):
        node = (yaml.safe_load(path.read_text()) or {}).get("scheduler") or {}
        cls = scheduler_class(node.get("_target_"))
        if cls is not None:
            found[path.stem] = cls
    return found


def samplers_for(objective: type[Objective], train_config: Mapping[str, Any]) -> list[str]:
    """The `conf/sampler` presets that can sample a model trained with `objective` and `train_config`."""
    return [name for name, cls in conf_samplers().items() if objective.sampler_problem(cls, train_config) is None]


def scheduler_class(target: Any) -> type | None:
    """The scheduler class of a sampler `_target_` (`diffusers.DDIMScheduler.from_config` -> DDIMScheduler)."""
    if not isinstance(target, str):
        return None
    from hydra.utils import get_class

    try:
        return get_class(target.removesuffix(".from_config"))
    except Exception:  # named by `check_targets`
        return None


def _objective_class(target: Any) -> type[Objective] | None:
    if not isinstance(target, str):
        return None
    from hydra.utils import get_class

    try:
        cls = get_class(canonical_target(target))
    except Exception:  # named by `check_targets`
        return None
    return cls if issubclass(cls, Objective) else None


def _or(names: list[str]) -> str:
    if not names:
        return "<a preset of conf/sampler/ that fits>"
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
