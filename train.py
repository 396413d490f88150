"""Train a diffusion backbone: `python train.py experiment=<name> [key=value ...]` (see README)."""

from pathlib import Path

from latentdiff.cli import hydra_entry
from latentdiff.rundir import check_location
from latentdiff.train import train

if __name__ == "__main__":
    hydra_entry(train, Path(__file__).resolve().parent / "conf", "train", precheck=check_location)
