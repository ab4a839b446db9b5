"""The per-worker BN's implementations (normbench.norms: ``per_worker`` and ``folded``, the
library's batch-norm kernel; ``hand_written``, ChunkBatchNorm) compute the same step: in float64
the same output, input/weight/bias gradients and running statistics, for one worker and
several, NCHW and channels_last. The device's default is one of them; bf16 inputs keep fp32
statistics. CUDA versions of the checks are marked ``cuda`` (make gpu-check)."""

from __future__ import annotations


import pytest
import torch
from torch import nn

import normbench.norms

from normbench.norms import (CHUNKED_BN_DEFAULT, CHUNKED_BN_VARIANTS, NormConfigError,
                             StatisticsSum, VirtualBatchNorm2d, chunked_bn_variant,
                             folded_batch_norm, hand_written_batch_norm, per_worker_batch_norm,
                             use_chunked_bn)

LIBRARY_VARIANTS = [v for v in CHUNKED_BN_VARIANTS if v != "hand_written"]
FUNCTIONS = {"per_worker": per_worker_batch_norm, "folded": folded_batch_norm,
             "hand_written": hand_written_batch_norm}
SHAPES = [(1, 4), (8, 2), (3, 5)]  # (workers, images per worker)


def _inputs(workers: int, batch: int, channels_last: bool, device: str = "cpu",
            dtype: torch.dtype = torch.float64):
    generator = torch.Generator().manual_seed(workers * 10 + batch)
    # every chunk with its own scale and offset, so that per-chunk statistics matter
    x = torch.randn(workers * batch, 6, 5, 7, generator=generator, dtype=dtype)
    x = (x * torch.linspace(0.5, 3, workers * batch, dtype=dtype).view(-1, 1, 1, 1)
         + torch.arange(workers * batch, dtype=dtype).view(-1, 1, 1, 1))
    x = x.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.rand(6, generator=generator, dtype=dtype).add(0.5).to(device)
    bias = torch.randn(6, generator=generator, dtype=dtype).to(device)
    grad = torch.randn(x.shape, generator=generator, dtype=dtype).to(device)
    return x, weight, bias, grad


def _step(function, x, weight, bias, grad, batch):
    """Output, the three gradients and the (W, C) statistics of one forward and backward."""
    x, weight, bias = (t.detach().clone().requires_grad_(True) for t in (x, weight, bias))
    out, mean, var = function(x, weight, bias, 1e-5, batch)
    out.backward(grad)
    return {"out": out, "grad_x": x.grad, "grad_weight": weight.grad, "grad_bias": bias.grad,
            "mean": mean, "var": var}


@pytest.mark.parametrize("variant", LIBRARY_VARIANTS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("workers,batch", SHAPES)
def test_library_kernel_variants_equal_the_hand_written_one(variant, channels_last, workers,
                                                            batch):
    x, weight, bias, grad = _inputs(workers, batch, channels_last)
    expected = _step(hand_written_batch_norm, x, weight, bias, grad, batch)
    got = _step(FUNCTIONS[variant], x, weight, bias, grad, batch)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-10, atol=1e-10,
                                   msg=lambda m, key=key: f"{key}: {m}")
    assert got["mean"].shape == got["var"].shape == (workers, 6)
    # the layout stays: no copy back to NCHW between two channels_last convs
    assert got["out"].is_contiguous(memory_format=torch.channels_last) == channels_last
    assert got["grad_x"].is_contiguous(memory_format=torch.channels_last) == channels_last
    # and the statistics are each chunk's own (unbiased variance for the running estimate)
    chunks = x.view(workers, batch, 6, -1).transpose(1, 2).reshape(workers, 6, -1)
    torch.testing.assert_close(got["mean"], chunks.mean(2))
    torch.testing.assert_close(got["var"], chunks.var(2, correction=1))


def _layer(x: torch.Tensor, batch: int) -> VirtualBatchNorm2d:
    torch.manual_seed(0)
    bn = VirtualBatchNorm2d(6, virtual_batch=batch).to(x.device, x.dtype)
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    nn.init.uniform_(bn.bias, -1, 1)
    return bn


@pytest.mark.parametrize("variant", LIBRARY_VARIANTS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_layer_running_statistics_and_modes_equal_the_hand_written_ones(variant, channels_last):
    x, _, _, grad = _inputs(8, 2, channels_last)
    layers = {}
    for name in ("hand_written", variant):
        bn = _layer(x, 2)
        with use_chunked_bn(name):
            for _ in range(3):  # three training steps: the moving averages move
                xi = x.detach().clone().requires_grad_(True)
                bn(xi).backward(grad)
            # collect mode (Precise BN) takes the statistics of a single worker, too
            bn.stats_mode = "collect"
            bn.collected = StatisticsSum()
            bn(x[:2])
            bn(x)
        layers[name] = (bn, xi.grad)
    (reference, reference_grad), (got, got_grad) = layers["hand_written"], layers[variant]
    torch.testing.assert_close(got_grad, reference_grad, rtol=1e-10, atol=1e-10)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(got.state_dict()[key], value, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.weight.grad, reference.weight.grad, rtol=1e-10, atol=1e-10)
    assert got.num_batches_tracked.item() == 3 and got.collected.chunks == 1 + 8
    for key, value in reference.collected.averages().items():
        torch.testing.assert_close(got.collected.averages()[key], value)


def test_the_default_is_a_variant_per_device_and_layout_and_a_choice_can_be_forced():
    nchw = torch.zeros(4, 3, 2, 2)
    nhwc = nchw.contiguous(memory_format=torch.channels_last)
    for device, defaults in CHUNKED_BN_DEFAULT.items():
        assert set(defaults) == {"nchw", "channels_last"}
        assert set(defaults.values()) <= set(CHUNKED_BN_VARIANTS), device
    assert chunked_bn_variant(nchw) == CHUNKED_BN_DEFAULT["cpu"]["nchw"]
    assert chunked_bn_variant(nhwc) == CHUNKED_BN_DEFAULT["cpu"]["channels_last"]
    # the layer calls the chosen implementation
    bn = VirtualBatchNorm2d(3, virtual_batch=2)
    for variant in CHUNKED_BN_VARIANTS:
        with use_chunked_bn(variant):
            assert chunked_bn_variant(nhwc) == variant
            calls = []
            original = FUNCTIONS[variant]

            def spy(*args, original=original, calls=calls):
                calls.append(args[-1])
                return original(*args)
            with pytest.MonkeyPatch.context() as patch:
                patch.setitem(normbench.norms._CHUNKED_BN, variant, spy)
                bn(nchw)
            assert calls == [2]
    assert chunked_bn_variant(nchw) == CHUNKED_BN_DEFAULT["cpu"]["nchw"]  # restored
    with pytest.raises(NormConfigError, match="'fast' is unknown; choose one of: per_worker, "
                                              "folded, hand_written"):
        with use_chunked_bn("fast"):
            pass


@pytest.mark.parametrize("variant", CHUNKED_BN_VARIANTS)
def test_bf16_inputs_keep_fp32_statistics(variant):
    # under CPU bf16 autocast the conv before a BN gives bf16: the kernel must take the
    # statistics in fp32 (as cuDNN does), the output stays bf16 for the next conv
    x, weight, bias, _ = _inputs(4, 2, False, dtype=torch.float32)
    x16 = x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, mean, var = FUNCTIONS[variant](x16, weight, bias, 1e-5, 2)
    assert out.dtype == torch.bfloat16 and mean.dtype == var.dtype == torch.float32
    chunks = x16.double().view(4, 2, 6, -1).transpose(1, 2).reshape(4, 6, -1)
    torch.testing.assert_close(mean.double(), chunks.mean(2), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(var.double(), chunks.var(2), rtol=1e-5, atol=1e-5)
    reference = _step(hand_written_batch_norm, x16.double(), weight.double(), bias.double(),
                      torch.ones_like(x16, dtype=torch.float64), 2)["out"]
    torch.testing.assert_close(out.double(), reference, rtol=8e-3, atol=8e-3)


# ---- the same on CUDA (make gpu-check) ---------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("variant", LIBRARY_VARIANTS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_cuda_library_kernel_variants_equal_the_hand_written_one(variant, channels_last):
    for workers, batch in SHAPES:
        x, weight, bias, grad = _inputs(workers, batch, channels_last, device="cuda")
        expected = _step(hand_written_batch_norm, x, weight, bias, grad, batch)
        got = _step(FUNCTIONS[variant], x, weight, bias, grad, batch)
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-9, atol=1e-9,
                                       msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.cuda
@pytest.mark.parametrize("variant", CHUNKED_BN_VARIANTS)
def test_cuda_bf16_autocast_keeps_fp32_statistics(variant):
    x, weight, bias, _ = _inputs(8, 2, True, device="cuda", dtype=torch.float32)
    x16 = x.bfloat16()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, mean, var = FUNCTIONS[variant](x16, weight, bias, 1e-5, 2)
    assert out.dtype == torch.bfloat16 and mean.dtype == var.dtype == torch.float32
    chunks = x16.double().view(8, 2, 6, -1).transpose(1, 2).reshape(8, 6, -1)
    torch.testing.assert_close(mean.double(), chunks.mean(2), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(var.double(), chunks.var(2), rtol=1e-5, atol=1e-5)
