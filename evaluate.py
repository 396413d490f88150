"""Score samples: `python evaluate.py samples=<out>/samples.npz reference=<stats or images> metrics=[fid,isc]`."""

from pathlib import Path

from latentdiff.cli import hydra_entry
from latentdiff.evaluate import run_evaluation

if __name__ == "__main__":
    hydra_entry(run_evaluation, Path(__file__).resolve().parent / "conf", "evaluate", cleanup_run_dir=False)
