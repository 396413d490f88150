"""Generate images: `python sample.py ckpt=<run>/last.ckpt num_samples=50000` (see conf/sample.yaml)."""

from pathlib import Path

from latentdiff.cli import hydra_entry

if __name__ == "__main__":
    hydra_entry(
        "latentdiff.sample:run_sampling",
        Path(__file__).resolve().parent / "conf",
        "sample",
        cleanup_run_dir=False,
        pass_overrides=True,
    )
