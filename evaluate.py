"""Score samples: `python evaluate.py samples=<out>/samples.npz reference=<stats or images> metrics=[fid,isc]`."""

from pathlib import Path

from latentdiff.cli import hydra_entry

if __name__ == "__main__":
    hydra_entry(
        "latentdiff.evaluate:run_evaluation",
        Path(__file__).resolve().parent / "conf",
        "evaluate",
        cleanup_run_dir=False,
    )
