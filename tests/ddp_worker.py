"""One optimizer step of the tiny U-ViT through Lightning, on 1 process or under torchrun on several (DDP, gloo).

Each dataset item's noise and timestep are drawn from its index, so the step is the same computation whatever
the number of processes; only the split of the global batch (`data.batch_size`) over ranks changes. Rank 0
saves the backbone's gradients as the optimizer sees them (after DDP's all-reduce) and the items it saw.

    python tests/ddp_worker.py OUT.pt                                   # 1 process, the whole batch
    torchrun --nproc-per-node 2 tests/ddp_worker.py OUT.pt              # 2 processes, half each
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra.utils import instantiate

from latentdiff.module import DiffusionModule
from latentdiff.strategies import trainer_batch
from latentdiff.train import build_module
from tests.conftest import compose_config

GLOBAL_BATCH = 8


class FixedNoiseModule(DiffusionModule):
    """Training step with per-item noise and timestep (a function of the dataset index only)."""

    out: Path

    def training_step(self, batch, batch_idx):
        x0 = self.autoencoder.model_input(batch)  # pixel space: the images themselves
        draws = [torch.Generator().manual_seed(int(i)) for i in batch["index"]]
        t = torch.stack([torch.randint(0, 1000, (), generator=g) for g in draws])  # (B,)
        eps = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in draws])  # (B, C, H, W)
        self.seen = batch["index"]
        loss, _ = self.diffusion.loss(self.backbone, x0, batch["cond"], t=t, eps=eps)
        return loss

    def on_before_optimizer_step(self, optimizer):
        grads = {n: p.grad.detach().clone() for n, p in self.backbone.named_parameters() if p.grad is not None}
        seen = self.all_gather(self.seen).flatten()  # (global batch,) over ranks
        if self.trainer.is_global_zero:
            torch.save({"grads": grads, "seen": seen, "world": self.trainer.world_size}, self.out)


def main(out: str) -> None:
    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    cfg = compose_config(
        [
            "model=uvit_tiny",
            "model.embed_dim=32",
            "model.num_heads=2",
            "module.p_uncond=0",  # no label dropout: the condition is the batch's
            "module.ema=null",
            "data.num_train=64",
            "data.num_val=8",
            f"data.batch_size={GLOBAL_BATCH}",
            "optim.lr=0",
        ]
    )
    torch.manual_seed(0)
    module = build_module(cfg)
    module.__class__ = FixedNoiseModule
    module.out = Path(out)
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy

    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=DDPStrategy(process_group_backend="gloo") if world > 1 else "auto",
        max_steps=1,
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=None,
    )
    datamodule = instantiate(cfg.data, batch_size=trainer_batch(trainer, GLOBAL_BATCH))
    trainer.fit(module, datamodule=datamodule)


if __name__ == "__main__":
    main(sys.argv[1])
