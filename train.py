"""Train a diffusion backbone: `python train.py experiment=<name> [key=value ...]` (see README)."""

from pathlib import Path

from latentdiff.cli import hydra_entry
from latentdiff.precheck import check_train

if __name__ == "__main__":
    hydra_entry("latentdiff.train:train", Path(__file__).resolve().parent / "conf", "train", precheck=check_train)
