"""The loss curve's smoothed line: a debiased exponential moving average (Adam's and TensorBoard's correction)."""

from __future__ import annotations

import pytest

from latentdiff.callbacks.monitoring import debiased_ema


def test_the_smoothed_line_is_debiased():
    assert debiased_ema([3.0, 3.0, 3.0], 0.9) == pytest.approx([3.0, 3.0, 3.0])  # a constant stays constant
    smooth = debiased_ema([1.0, 0.0], 0.9)
    assert smooth[0] == 1.0 and smooth[1] == pytest.approx(0.09 / 0.19)  # (0.9 * 0.1 * 1 + 0.1 * 0) / (1 - 0.81)
    # a loss falling from 1.0 to 0.2 in 40 points: the debiased line ends near the recent values; the EMA that
    # starts at the first value (the old curve) still holds 0.95**40 = 13% of the start
    losses = [1.0 - 0.8 * min(i, 20) / 20 for i in range(41)]
    old, acc = [], losses[0]
    for value in losses:
        acc = 0.95 * acc + 0.05 * value
        old.append(acc)
    assert debiased_ema(losses, 0.95)[-1] < old[-1] - 0.05
