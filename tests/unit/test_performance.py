"""The fast training step: no host-device sync between log steps, the device-side skip of non-finite steps,
gradient clipping from the guard's norm, EMA on the device, regional compilation, channels_last UNets."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from latentdiff.compile import compile_regions
from latentdiff.ema import EMA
from latentdiff.errors import ConfigError
from latentdiff.models.build import build_backbone
from latentdiff.train import build_module
from latentdiff.validation import validate_train_config


def test_clipping_reuses_the_guard_norm_and_equals_torch_clip_grad_norm(compose_cfg):
    module = build_module(compose_cfg(["model=uvit_tiny"]))
    module._trainer = SimpleNamespace(strategy=object())
    torch.manual_seed(0)
    for p in module.backbone.parameters():
        p.grad = torch.randn_like(p)
    reference = copy.deepcopy(module.backbone)
    for ours, theirs in zip(module.backbone.parameters(), reference.parameters(), strict=True):
        theirs.grad = ours.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    module._grad_norm = torch.linalg.vector_norm(
        torch.stack(torch._foreach_norm([p.grad for p in module.backbone.parameters()]))
    )
    torch.testing.assert_close(module._grad_norm, expected)
    module.configure_gradient_clipping(None, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
    for ours, theirs in zip(module.backbone.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=0)


def test_ema_update_masked_on_the_device_is_a_no_op_and_equals_the_plain_update():
    net = torch.nn.Linear(4, 4)
    ema, plain = EMA(net, decay=0.99), EMA(net, decay=0.99)
    with torch.no_grad():
        net.weight.add_(1.0)
    before = ema.model.weight.clone()
    ema.update(net, 3, apply=torch.tensor(False))
    assert torch.equal(ema.model.weight, before) and int(ema.num_updates) == 0
    ema.update(net, 3, apply=torch.tensor(True))
    plain.update(net, 3)
    assert torch.equal(ema.model.weight, plain.model.weight) and int(ema.num_updates) == 1
    # the warm-up decay computed on the device is the float formula: min(d, (1 + n) / (10 + n)) with n = 0
    expected = before + (1 - 1 / 10) * (net.weight.detach() - before)
    torch.testing.assert_close(ema.model.weight, expected, rtol=0, atol=1e-6)


def test_fused_adamw_skip_on_the_device_leaves_weights_and_state_unchanged():
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    p.grad = torch.ones(4)
    opt.step()
    state = {k: v.clone() for k, v in opt.state[p].items()}
    weight = p.detach().clone()
    p.grad = torch.full((4,), float("nan"))
    opt.found_inf = torch.tensor(1.0)  # what DiffusionModule sets for a non-finite step
    opt.step()
    assert torch.equal(p.detach(), weight)
    assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())


def test_fp16_with_a_fused_optimizer_and_clipping_is_a_one_line_error(compose_cfg):
    cfg = compose_cfg(["trainer.precision=16-mixed", "trainer.gradient_clip_val=1.0"])
    with pytest.raises(ConfigError, match=r"trainer.precision=16-mixed with optim.optimizer.fused=true"):
        validate_train_config(cfg)
    validate_train_config(compose_cfg(["trainer.precision=16-mixed", "optim.optimizer.fused=false"]))


@pytest.mark.parametrize("model", ["uvit_tiny", "unet_tiny"])
def test_compile_regions_are_the_repeated_blocks(compose_cfg, model):
    backbone = build_backbone(compose_cfg([f"model={model}"]).model)
    regions = compile_regions(backbone)
    if model == "uvit_tiny":
        assert regions == [*backbone.in_blocks, backbone.mid_block, *backbone.out_blocks]
    else:
        unet = backbone.unet
        blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
        assert len(regions) == len(blocks) and set(map(id, regions)) == set(map(id, blocks))


def test_unknown_compile_scope_is_a_one_line_error(compose_cfg):
    module = build_module(compose_cfg(["model=uvit_tiny", "+module.compile.scope=layers"]))
    with pytest.raises(ValueError, match=r"module.compile.scope='layers' is not allowed; use one of 'model', 'blocks'"):
        module.configure_model()


def test_channels_last_unet_gives_the_same_outputs_and_gradients(compose_cfg):
    cfg = compose_cfg(["model=unet_tiny"]).model
    torch.manual_seed(0)
    plain = build_backbone(cfg)
    cfg.channels_last = True
    nhwc = build_backbone(cfg)
    nhwc.load_state_dict(plain.state_dict())
    assert nhwc.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 700]), torch.tensor([0, 2])
    out_plain, out_nhwc = plain(x, t, y), nhwc(x, t, y)
    torch.testing.assert_close(out_nhwc, out_plain, rtol=1e-4, atol=1e-5)
    out_plain.square().mean().backward()
    out_nhwc.square().mean().backward()
    grads = [(a.grad, b.grad) for a, b in zip(plain.parameters(), nhwc.parameters(), strict=True)]
    assert all(torch.allclose(a, b.contiguous(), rtol=1e-3, atol=1e-5) for a, b in grads)


def test_peak_flops_reads_lightnings_gpu_table_for_the_run_precision(monkeypatch):
    """The MFU denominator on a GPU: Lightning's table at the compute dtype of the run's precision (the
    private helpers it needs resolve in this Lightning version; on a CPU there is none)."""
    import lightning.fabric.utilities.throughput as throughput

    from latentdiff.lightning_internals import peak_flops

    asked = []
    monkeypatch.setattr(throughput, "get_available_flops", lambda device, dtype: asked.append(dtype) or 989e12)
    plugin = L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_checkpointing=False)
    gpu = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    gpu.precision_plugin = plugin.precision_plugin
    assert peak_flops(gpu) == 989e12 and asked == [torch.bfloat16]
    assert peak_flops(plugin) is None  # a CPU run: no peak, no MFU
