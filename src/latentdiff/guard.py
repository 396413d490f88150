"""What a training step does with a NaN/Inf loss or gradient: skip the update, or stop the run.

`DiffusionModule` shows the guard each micro-batch's loss (`observe`) and asks it at each optimizer step
(`check_step`: `judge`, then `skip_if_bad`). The verdict stays on the device: with an optimizer that can skip a
step on the device (fused AdamW/Adam/SGD read `found_inf`, as AMP's grad scaler uses them) the check costs no
host-device sync, and the host learns of skipped steps at the next `flush` (a log step or a checkpoint).
The gradient norm it checks (`grad_norm`) also serves gradient clipping (`clip_by_norm`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from latentdiff.errors import NonFiniteError

log = logging.getLogger(__name__)

# verdicts of a step, kept on the device
FINITE, BAD_GRADIENT, BAD_LOSS = 0, 1, 2


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients together (as `clip_grad_norm_` computes it), on the device."""
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def clip_by_norm(grads: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """Scale `grads` in place as `torch.nn.utils.clip_grad_norm_` does, from their norm computed already (one
    pass over the gradients instead of two, no sync): by min(1, max_norm / (norm + 1e-6))."""
    if grads:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].device))


def clip_gradients(
    params: Iterable[nn.Parameter], max_value: float | None, algorithm: str | None, norm: torch.Tensor, sharded=None
) -> None:
    """`trainer.gradient_clip_val`/`gradient_clip_algorithm` on `params`' gradients: by value, or by norm from their
    norm computed already for the guard (`clip_by_norm`); a `sharded` (FSDP) model clips by the norm over all
    its shards. Nothing when `max_value` is 0 or None."""
    if not max_value:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if algorithm == "value":
        torch.nn.utils.clip_grad_value_(grads, max_value)
    elif sharded is not None:
        sharded.clip_grad_norm_(max_value)
    else:
        clip_by_norm(grads, max_value, norm)


def all_ranks_max(value: torch.Tensor) -> torch.Tensor:
    """The maximum of `value` over all ranks: a collective queued on the device, no host-device sync."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


class NonFiniteGuard:
    """Counts steps with a non-finite loss or gradient and decides when to stop (`module.nonfinite`).

    Args:
        policy: "skip" (skip up to `max_skips` consecutive steps, then stop), "stop" (stop at the first), "off"
            (check nothing).
        max_skips: consecutive skipped steps allowed before the run stops with `NonFiniteError`, before any
            checkpoint holds them.
    """

    POLICIES = ("skip", "stop", "off")

    def __init__(self, policy: str = "skip", max_skips: int = 5):
        if policy not in self.POLICIES:
            raise ValueError(
                f"module.nonfinite.policy={policy!r} is not allowed; use one of {', '.join(self.POLICIES)}"
            )
        if isinstance(max_skips, bool) or not isinstance(max_skips, int) or max_skips < 0:
            raise ValueError(f"module.nonfinite.max_skips={max_skips!r} must be an integer >= 0")
        self.policy, self.max_skips = policy, max_skips
        self.consecutive, self.total = 0, 0
        self._pending: list[tuple[int, int, torch.Tensor | None, torch.Tensor]] = []
        self._loss_finite: torch.Tensor | None = None  # all micro-batch losses of this step finite (device bool)
        self._indices: list[torch.Tensor] = []  # dataset indices of this step's micro-batches

    def observe(self, loss: torch.Tensor, indices: torch.Tensor | None = None) -> None:
        """Note one micro-batch's loss and its dataset indices (nothing is read from the device)."""
        finite = torch.isfinite(loss.detach())
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        if indices is not None:
            self._indices.append(indices.detach())

    def check_step(
        self,
        norm: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        params: Iterable[nn.Parameter],
        step: int,
        epoch: int,
        fp16_scaling: bool = False,
    ) -> torch.Tensor | bool:
        """Before optimizer step `step` (1-based): judge the micro-batches observed since the last one and make
        the optimizer skip a bad step (see `skip_if_bad`); returns whether the update applies.

        Args:
            norm: the step's gradient norm (non-finite when any gradient is).
            fp16_scaling: fp16 loss scaling is on: its Inf gradients are by design (the scaler skips those steps
                and owns `optimizer.found_inf`), so only the loss is checked.
        """
        loss_finite, self._loss_finite = self._loss_finite, None
        indices, self._indices = self._indices, []
        if hasattr(optimizer, "found_inf") and not fp16_scaling:
            del optimizer.found_inf  # left by an earlier step
        if self.policy == "off":
            return True
        ok = self.judge(norm, loss_finite, indices, step, epoch, check_gradient=not fp16_scaling)
        return self.skip_if_bad(ok, optimizer, params, on_device=not fp16_scaling)

    @property
    def pending(self) -> bool:
        """Verdicts recorded on the device and not read back yet."""
        return bool(self._pending)

    def judge(
        self,
        norm: torch.Tensor,
        loss_finite: torch.Tensor | None,
        indices: list[torch.Tensor],
        step: int,
        epoch: int,
        check_gradient: bool = True,
    ) -> torch.Tensor:
        """One optimizer step's verdict, agreed by all ranks and recorded for `flush`; returns "finite" (device bool).

        Args:
            norm: the step's gradient norm (non-finite when any gradient is).
            loss_finite: all micro-batch losses of the step were finite (a device bool), or None (not known).
            indices: the dataset indices of the step's micro-batches (named in the error).
            step: the optimizer step (1-based), epoch: the epoch, both named in the error.
            check_gradient: False under fp16 loss scaling, whose Inf gradients are by design (the scaler skips them).
        """
        verdict = torch.full((), FINITE, dtype=torch.int32, device=norm.device)
        if check_gradient:
            verdict = torch.where(torch.isfinite(norm), verdict, BAD_GRADIENT)
        if loss_finite is not None:
            verdict = torch.where(loss_finite.to(verdict.device), verdict, BAD_LOSS)
        verdict = all_ranks_max(verdict)  # a step skipped anywhere is skipped everywhere (weights stay equal)
        self.record(step, epoch, torch.cat(indices) if indices else None, verdict)
        return verdict == FINITE

    def skip_if_bad(
        self, ok: torch.Tensor, optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter], on_device: bool
    ) -> torch.Tensor | bool:
        """Make `optimizer` leave the weights unchanged when `ok` is False; returns whether the update applies.

        On the device when `on_device` and the optimizer can (fused kernels read `found_inf`): the answer is `ok`
        itself. Otherwise the verdict is read now and a bad step's gradients are dropped (the optimizer leaves
        parameters without gradients untouched): the answer is a host bool.
        """
        if on_device and getattr(optimizer, "_step_supports_amp_scaling", False):
            optimizer.found_inf = (~ok).float()
            return ok
        self.flush()
        if bool(ok):
            return True
        for p in params:
            p.grad = None
        return False

    def record(self, step: int, epoch: int, indices: torch.Tensor | None, verdict: torch.Tensor) -> None:
        """Keep one step's verdict (a device int: 0 finite, 1 non-finite gradient, 2 non-finite loss) and its
        batch's dataset indices, to be read back by `flush`."""
        self._pending.append((step, epoch, indices, verdict))

    def flush(self) -> int:
        """Read the recorded verdicts back in one transfer and apply the policy to each step in order; returns
        the number of non-finite steps among them."""
        if not self._pending:
            return 0
        before = self.total
        pending, self._pending = self._pending, []
        verdicts = torch.stack([v.reshape(()) for *_, v in pending]).tolist()
        for (step, epoch, indices, _), verdict in zip(pending, verdicts, strict=True):
            if verdict == FINITE:
                self.finite()
            else:
                what = "loss" if verdict == BAD_LOSS else "gradient"
                self.nonfinite(what, step, epoch, [] if indices is None else indices.tolist())
        return self.total - before

    def nonfinite(self, what: str, step: int, epoch: int, indices: list[int]) -> None:
        """Record a bad step; raise `NonFiniteError` when the policy says stop."""
        self.consecutive += 1
        self.total += 1
        shown = ", ".join(map(str, indices[:16])) + (", ..." if len(indices) > 16 else "")
        where = f"non-finite {what} at step {step} (epoch {epoch}, dataset indices [{shown}])"
        if self.policy == "stop" or self.consecutive > self.max_skips:
            limit = "" if self.policy == "stop" else f" after {self.max_skips} consecutive skipped steps"
            raise NonFiniteError(
                f"{where}: training stopped{limit} (module.nonfinite.policy={self.policy}); the last checkpoint "
                "holds the last good state -- lower optim.lr, check the data, or raise module.nonfinite.max_skips"
            )
        log.warning("%s: update skipped (%d of %d consecutive allowed)", where, self.consecutive, self.max_skips)

    def finite(self) -> None:
        """Record a good step (the count of consecutive bad steps restarts)."""
        self.consecutive = 0

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive, self.total = int(state.get("consecutive", 0)), int(state.get("total", 0))
