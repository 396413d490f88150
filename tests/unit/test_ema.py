"""EMA: the update rule, warm-up, buffers, and that it is never trained."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from latentdiff.ema import EMA
from latentdiff.validation import validate_train_config


def _decay_of_next_update(ema: EMA, net: nn.Module, step: int) -> float:
    """The decay d one `update` applies, read from its result: from ema = 0 towards w = 1, ema <- 1 - d."""
    with torch.no_grad():
        ema.model[0].weight.zero_()
        net[0].weight.fill_(1.0)
    ema.update(net, step=step)
    return 1.0 - float(ema.model[0].weight[0, 0])


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def test_update_rule_without_warmup():
    net = _net()
    ema = EMA(net, decay=0.9, warmup=False)
    start = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net, step=0)
    for e, s, p in zip(ema.model.parameters(), start, net.parameters()):
        torch.testing.assert_close(e, 0.9 * s + 0.1 * p)


def test_warmup_and_start_step_and_buffers():
    net = _net()
    ema = EMA(net, decay=0.999, warmup=True, start_step=2)
    net[1].running_mean.fill_(3.0)
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    ema.update(net, step=0)  # before start_step: a copy
    assert torch.equal(ema.model[0].weight, net[0].weight)
    assert torch.equal(ema.model[1].running_mean, net[1].running_mean)  # buffers are copied
    assert _decay_of_next_update(ema, net, step=2) == pytest.approx((1 + 1) / (10 + 1))
    for _ in range(10_000):
        ema.num_updates += 1
    assert _decay_of_next_update(ema, net, step=3) == pytest.approx(0.999, rel=0, abs=1e-9)  # the target caps it


def test_ema_is_frozen_and_stays_in_eval():
    ema = EMA(_net(), decay=0.99)
    ema.train()
    assert not ema.model.training
    assert all(not p.requires_grad for p in ema.model.parameters())


def test_update_every():
    net = _net()
    ema = EMA(net, decay=0.5, warmup=False, update_every=2)
    before = ema.model[0].weight.clone()
    with torch.no_grad():
        net[0].weight.add_(1)
    ema.update(net, step=1)
    assert torch.equal(ema.model[0].weight, before)
    ema.update(net, step=2)
    assert not torch.equal(ema.model[0].weight, before)


def test_bad_decay(compose_cfg):
    # the range of module.ema.decay is checked once, with the run config, before the EMA is built
    with pytest.raises(ValueError, match=r"ema.decay=1.0 must be in \[0, 1\)"):
        validate_train_config(compose_cfg(["module.ema.decay=1.0"]))
