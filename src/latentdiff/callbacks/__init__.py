"""Training callbacks, one file per concern: checkpointing (periodic, timed, on a stop signal), previews (sample
grid, FID) and monitoring (loss curve, progress bar, throughput). The configs name them `latentdiff.callbacks.X`
(`conf/callbacks/`)."""

from latentdiff.callbacks.checkpointing import Checkpoint, Preemption
from latentdiff.callbacks.monitoring import LossCurve, ProgressBar, Throughput
from latentdiff.callbacks.previews import FID, SampleGrid, metric_name

__all__ = ["FID", "Checkpoint", "LossCurve", "Preemption", "ProgressBar", "SampleGrid", "Throughput", "metric_name"]
