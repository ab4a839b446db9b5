"""The fast paths (normbench/fast_paths.py) change how the model runs, not what it computes:
training steps with channels_last or torch.compile on give the losses and parameters they give
off, up to floating-point rounding. Also the single-pass virtual-worker BN
(normbench.norms.ChunkBatchNorm) on the inputs the fast paths feed it: NHWC and 16-bit.
The benchmark itself is tests/test_bench.py."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from conftest import compose_config
from normbench.config import ConfigError, run_name, validate_config
from normbench.fast_paths import CPU_CHANNELS_LAST, use_channels_last
from normbench.norms import NORMS, NormConfigError, build_norm
from normbench.train import Trainer

# 4 steps of 8 images (2 virtual workers of 4) on resnet8; a large learning rate so that the
# parameters move far from their start and a wrong fast path cannot hide.
STEPS = ["model=resnet8", "dataset=synthetic", "dataset.train_size=32", "dataset.test_size=40",
         "dataset.image_size=16", "batch=4", "workers=2", "epochs=1", "optim.lr_per_256=1.6",
         "optim.milestones=[0.9]", "wandb.mode=disabled", "progress=false", "device=cpu",
         # fp32: these tests compare layouts and compilation, which differ in rounding only;
         # under bf16 autocast (precision=auto on a CPU with bf16 units) that rounding is 1e-3
         "precision=fp32"]


def trained(overrides: list[str]) -> tuple[Trainer, dict[str, float], dict[str, torch.Tensor]]:
    """A trainer after one epoch (4 steps), its metrics and a copy of its state dict."""
    torch.manual_seed(0)
    trainer = Trainer(compose_config(STEPS + overrides), folder=None)
    metrics = trainer.train_epoch()
    state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return trainer, metrics, state


def assert_same_training(a: tuple, b: tuple, *, rtol: float = 1e-4, atol: float = 1e-4) -> None:
    (_, metrics_a, state_a), (_, metrics_b, state_b) = a, b
    assert metrics_a["train_loss"] == pytest.approx(metrics_b["train_loss"], rel=rtol)
    assert state_a.keys() == state_b.keys()  # checkpoints keep their keys
    for key in state_a:
        torch.testing.assert_close(state_b[key].contiguous(), state_a[key].contiguous(),
                                   rtol=rtol, atol=atol, msg=lambda m, key=key: f"{key}: {m}")


# ---- the settings --------------------------------------------------------------------------
def test_channels_last_auto_on_cuda_follows_the_registry():
    cuda = torch.device("cuda")
    for precision in (None, torch.bfloat16):
        assert use_channels_last("auto", "bn", cuda, precision)
        assert use_channels_last("auto", "frn", cuda, precision)
        for norm in ("gn", "ln", "in", "evonorm_s0"):  # torch's GroupNorm kernel / copying reshape
            assert not NORMS[norm].channels_last
            assert not use_channels_last("auto", norm, cuda, precision)


def test_channels_last_auto_on_the_cpu_is_per_norm_and_precision():
    cpu = torch.device("cpu")
    # the measured rule (results/bench item 9): NHWC pays for bn in fp32 and bf16 and for gn in
    # fp32; in bf16 torch's GroupNorm kernel is much slower in NHWC
    assert use_channels_last("auto", "bn", cpu, None)
    assert use_channels_last("auto", "bn", cpu, torch.bfloat16)
    assert use_channels_last("auto", "gn", cpu, None)
    assert not use_channels_last("auto", "gn", cpu, torch.bfloat16)
    for norm, precisions in CPU_CHANNELS_LAST.items():
        assert set(precisions) == {"fp32", "bf16"} and norm in NORMS
    for norm in set(NORMS) - set(CPU_CHANNELS_LAST):  # not measured on the CPU: NCHW
        assert not use_channels_last("auto", norm, cpu, None)
        assert not use_channels_last("auto", norm, cpu, torch.bfloat16)
    # true and false are what they say, whatever the norm, device and precision
    assert use_channels_last(True, "gn", cpu, torch.bfloat16)
    assert not use_channels_last(False, "bn", torch.device("cuda"), None)
    with pytest.raises(NormConfigError, match="unknown norm 'bm'"):
        use_channels_last("auto", "bm", cpu, None)


@pytest.mark.parametrize("precision,expected", [("fp32", True), ("bf16", False)])
def test_the_trainer_chooses_the_layout_for_the_precision_it_trains_in(precision, expected):
    trainer = Trainer(compose_config(STEPS + ["norm=gn", "norm.groups=4", "channels_last=auto",
                                              f"precision={precision}"]), folder=None)
    conv = trainer.model.stem[0].conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) == expected
    assert (trainer.memory_format == torch.channels_last) == expected  # what the run records


def test_fast_path_keys_are_checked_and_do_not_rename_the_run():
    base = compose_config(STEPS)
    assert (base["channels_last"], base["compile"], base["compile_mode"]) == ("auto", False,
                                                                              "default")
    fast = compose_config(STEPS + ["channels_last=true", "compile=true",
                                   "compile_mode=reduce-overhead"])
    validate_config(fast)
    assert run_name(fast) == run_name(base)  # rounding only: the same run folder
    for override, message in (("channels_last=nhwc", r"channels_last='nhwc' is not allowed; "
                                                     r"choose one of: auto, true, false"),
                              ("compile=maybe", r"compile='maybe' is not allowed"),
                              ("compile_mode=fast", r"compile_mode='fast' is not allowed; choose "
                                                    r"one of: default, reduce-overhead")):
        with pytest.raises(ConfigError, match=message):
            validate_config(compose_config(STEPS + [override]))


# ---- the single-pass virtual-worker BN on the fast paths' inputs ----------------------------
def _bn_outputs(x: torch.Tensor, bn: nn.Module) -> tuple[torch.Tensor, ...]:
    x = x.detach().requires_grad_(True)
    y = bn(x)
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)
    (y * weights).sum().backward()
    return y.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var


@pytest.mark.parametrize("workers,batch", [(8, 2), (3, 4)])
def test_virtual_bn_gives_the_same_step_on_channels_last_and_strided_inputs(workers, batch):
    torch.manual_seed(0)
    x = torch.randn(workers * batch, 6, 5, 7, dtype=torch.float64) * 3 + 2
    bns = [build_norm("bn", 6, virtual_batch=batch).double() for _ in range(3)]
    for bn in bns:
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -1, 1)
        bn.load_state_dict(bns[0].state_dict())
    nchw = _bn_outputs(x, bns[0])
    nhwc = _bn_outputs(x.to(memory_format=torch.channels_last), bns[1])
    assert nhwc[0].is_contiguous(memory_format=torch.channels_last)  # no copy back to NCHW
    odd = _bn_outputs(x.transpose(2, 3).contiguous().transpose(2, 3), bns[2])  # H, W swapped
    for a, b, c in zip(nchw, nhwc, odd):
        torch.testing.assert_close(b, a)
        torch.testing.assert_close(c, a)


def test_virtual_bn_output_takes_an_in_place_activation():
    # the output is a tensor of its own: ReLU(inplace=True) after it (every unit of the
    # ResNets) must give the gradient of the out-of-place composition
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    bn = build_norm("bn", 3, virtual_batch=2).double()
    grads = []
    for inplace in (False, True):
        xi = x.clone().requires_grad_(True)
        nn.ReLU(inplace=inplace)(bn(xi)).pow(2).sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[1], grads[0])


def test_virtual_bn_statistics_are_exact_far_from_zero():
    # the two-pass variance: a mean of 1000 next to a spread of 1 loses nothing in float32
    torch.manual_seed(0)
    x = torch.randn(16, 4, 6, 6, dtype=torch.float64) + 1000
    bn = build_norm("bn", 4, virtual_batch=2)
    y = bn(x.float())
    chunks = x.view(8, 2, 4, 36)
    ref = (chunks - chunks.mean((1, 3), keepdim=True)) / torch.sqrt(
        chunks.var((1, 3), correction=0, keepdim=True) + bn.eps)
    torch.testing.assert_close(y.double(), ref.view_as(x), atol=2e-3, rtol=0)


def test_virtual_bn_keeps_16_bit_inputs_16_bit_with_float32_statistics():
    torch.manual_seed(0)
    x = torch.randn(8, 4, 6, 6) * 2 + 1
    bn32, bn16 = build_norm("bn", 4, virtual_batch=2), build_norm("bn", 4, virtual_batch=2)
    y32 = _bn_outputs(x, bn32)
    y16 = _bn_outputs(x.bfloat16(), bn16)
    assert y16[0].dtype == y16[1].dtype == torch.bfloat16
    assert bn16.running_var.dtype == torch.float32
    torch.testing.assert_close(y16[0].float(), y32[0], atol=0.05, rtol=0.02)
    torch.testing.assert_close(y16[1].float(), y32[1], atol=0.05, rtol=0.05)
    torch.testing.assert_close(bn16.running_mean, bn32.running_mean, atol=0.01, rtol=0.01)


# ---- training steps with each fast path on and off -------------------------------------------
@pytest.mark.parametrize("norm", [["norm=bn"], ["norm=gn", "norm.groups=4"], ["norm=frn"]])
def test_channels_last_trains_like_nchw(norm):
    reference = trained(norm + ["channels_last=false"])
    fast = trained(norm + ["channels_last=true"])
    conv = fast[0].model.stem[0].conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert not reference[0].model.stem[0].conv.weight.is_contiguous(
        memory_format=torch.channels_last)
    assert_same_training(reference, fast)


def test_compile_true_compiles_the_model_in_place_and_trains_like_eager(monkeypatch):
    # The code path with torch.compile's aot_eager backend: Dynamo traces the model (custom
    # autograd function, running-statistics updates) and AOTAutograd builds forward and
    # backward graphs, without the minute of C++ compilation; the real compiler is the slow
    # test below.
    calls = []
    original = nn.Module.compile

    def compile_with_aot_eager(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, backend="aot_eager")

    monkeypatch.setattr(nn.Module, "compile", compile_with_aot_eager)
    torch._dynamo.reset()
    reference = trained(["norm=bn"])
    fast = trained(["norm=bn", "compile=true", "compile_mode=reduce-overhead"])
    assert calls == [{"mode": "reduce-overhead"}]
    assert getattr(fast[0].model, "_compiled_call_impl", None) is not None
    assert_same_training(reference, fast, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile's CPU backend (inductor) needs a C++ compiler")
@pytest.mark.parametrize("norm", [["norm=bn"], ["norm=gn", "norm.groups=4"]])
def test_compile_with_inductor_trains_like_eager(norm):
    # ~40 s per norm on 2 CPU cores (compilation), hence slow
    torch._dynamo.reset()
    reference = trained(norm)
    fast = trained(norm + ["compile=true"])
    assert_same_training(reference, fast)


# ---- on CUDA (make gpu-check) ------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("norm", [["norm=bn"], ["norm=gn", "norm.groups=4"]])
def test_cuda_default_path_trains_like_fp32_nchw(norm):
    # precision=auto is bf16 on CUDA, channels_last=auto NHWC for bn and NCHW for gn, the
    # per-worker BN the CUDA default: a few steps follow the fp32 NCHW ones to bf16 rounding
    cuda = [o.replace("device=cpu", "device=cuda") for o in STEPS if o != "precision=fp32"]
    torch.manual_seed(0)
    fast = Trainer(compose_config(cuda + norm + ["precision=auto"]), folder=None)
    assert fast.amp_dtype == torch.bfloat16
    assert (fast.memory_format == torch.channels_last) == (norm == ["norm=bn"])
    torch.manual_seed(0)
    reference = Trainer(compose_config(cuda + norm + ["precision=fp32", "channels_last=false"]),
                        folder=None)
    fast_metrics, reference_metrics = fast.train_epoch(), reference.train_epoch()
    assert fast_metrics["train_loss"] == pytest.approx(reference_metrics["train_loss"], rel=0.05)
    for (name, a), b in zip(reference.model.state_dict().items(),
                            fast.model.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(b.float().contiguous(), a.float().contiguous(),
                                       rtol=0.05, atol=0.05, msg=lambda m, n=name: f"{n}: {m}")
