"""Norm layers against independent float64 references written from the published formulas."""

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import compose_config

from normbench.norms import (NORMS, GroupNorm2d, NormConfigError, VirtualBatchNorm2d,
                             build_activation, build_norm, norm_options)

CONF = Path(__file__).parents[1] / "conf" / "norm"
EPS = 1e-5


# ---- references (float64, straight from the equations) -------------------------------------
def reference_bn(x, gamma, beta, eps=EPS):
    """Ioffe & Szegedy 2015: normalize each channel over (N, H, W) with the biased variance."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)


def reference_gn(x, groups, gamma, beta, eps=EPS):
    """Wu & He 2018, eq. (1)-(3): per sample, per group of C/G channels, over (C/G, H, W)."""
    n, c, h, w = x.shape
    g = x.reshape(n, groups, -1)
    mean = g.mean(dim=2, keepdim=True)
    var = ((g - mean) ** 2).mean(dim=2, keepdim=True)
    y = ((g - mean) / torch.sqrt(var + eps)).reshape(n, c, h, w)
    return y * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)


def randomize_affine(module: nn.Module) -> None:
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.5, 0.5)


def values_and_grads(fn, x, params):
    x = x.clone().requires_grad_(True)
    y = fn(x)
    weights = torch.randn_like(y)  # a random linear loss exercises every output's gradient
    grads = torch.autograd.grad((y * weights).sum(), [x, *params])
    return y.detach(), grads, weights


@pytest.mark.parametrize("name,groups", [("gn", 4), ("ln", 1), ("in", 8)])
def test_group_norms_match_reference_values_and_gradients(name, groups):
    torch.manual_seed(0)
    norm = build_norm(name, 8, **({"groups": 4} if name == "gn" else {})).double()
    randomize_affine(norm)
    x = torch.randn(3, 8, 5, 5, dtype=torch.float64) * 3 + 1
    ours, our_grads, w = values_and_grads(norm, x, [norm.weight, norm.bias])
    xr = x.clone().requires_grad_(True)
    gamma = norm.weight.detach().clone().requires_grad_(True)
    beta = norm.bias.detach().clone().requires_grad_(True)
    ref = reference_gn(xr, groups, gamma, beta)
    ref_grads = torch.autograd.grad((ref * w).sum(), [xr, gamma, beta])
    torch.testing.assert_close(ours, ref.detach())
    for a, b in zip(our_grads, ref_grads):
        torch.testing.assert_close(a, b)
    norm.eval()  # no running statistics: eval mode computes the same thing
    torch.testing.assert_close(norm(x), ref.detach())


def test_bn_train_mode_matches_reference_and_updates_running_statistics():
    torch.manual_seed(0)
    bn = build_norm("bn", 4).double()
    randomize_affine(bn)
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64) * 2 + 0.5
    ours, our_grads, w = values_and_grads(bn, x, [bn.weight, bn.bias])
    xr = x.clone().requires_grad_(True)
    gamma = bn.weight.detach().clone().requires_grad_(True)
    beta = bn.bias.detach().clone().requires_grad_(True)
    ref = reference_bn(xr, gamma, beta)
    ref_grads = torch.autograd.grad((ref * w).sum(), [xr, gamma, beta])
    torch.testing.assert_close(ours, ref.detach())
    for a, b in zip(our_grads, ref_grads):
        torch.testing.assert_close(a, b)
    # running <- (1 - m) * running + m * batch statistic (unbiased variance), from 0 and 1
    m = 0.1
    torch.testing.assert_close(bn.running_mean, m * x.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(bn.running_var, (1 - m) + m * x.var(dim=(0, 2, 3), unbiased=True))


def test_bn_eval_mode_uses_running_statistics():
    bn = build_norm("bn", 3).double().eval()
    randomize_affine(bn)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    expected = ((x - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1)
                + EPS) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1))
    torch.testing.assert_close(bn(x), expected.detach())


def test_bn_can_undo_itself():
    # With gamma = sqrt(var + eps) and beta = mean of the batch, train-mode BN is the identity.
    x = torch.randn(8, 5, 4, 4, dtype=torch.float64) * 3 + 2
    bn = build_norm("bn", 5).double()
    with torch.no_grad():
        bn.weight.copy_(torch.sqrt(x.var(dim=(0, 2, 3), unbiased=False) + EPS))
        bn.bias.copy_(x.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(bn(x), x)


def test_gradcheck_on_small_shapes():
    torch.manual_seed(0)
    x = torch.randn(4, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    for norm in (build_norm("bn", 4, virtual_batch=2), build_norm("gn", 4, groups=2),
                 build_norm("ln", 4), build_norm("in", 4)):
        norm = norm.double()
        randomize_affine(norm)
        assert torch.autograd.gradcheck(norm, (x,)), norm


# ---- virtual workers -------------------------------------------------------------------------
@pytest.mark.parametrize("workers,batch", [(8, 2), (4, 3), (2, 5)])
def test_virtual_workers_bn_equals_separate_worker_passes(workers, batch):
    torch.manual_seed(0)
    virtual = build_norm("bn", 6, virtual_batch=batch).double()
    randomize_affine(virtual)
    initial_state = {k: v.clone() for k, v in virtual.state_dict().items()}
    x = torch.randn(workers * batch, 6, 4, 4, dtype=torch.float64) * 2 + 1
    out, grads, w = values_and_grads(virtual, x, [virtual.weight, virtual.bias])

    # W separate workers, each a plain BN with the same weights seeing its own chunk
    separate = [nn.BatchNorm2d(6).double() for _ in range(workers)]
    xs = x.clone().requires_grad_(True)
    outs = []
    for k, bn in enumerate(separate):
        bn.load_state_dict(initial_state)
        outs.append(bn(xs[k * batch:(k + 1) * batch]))
    ref = torch.cat(outs)
    torch.testing.assert_close(out, ref.detach())
    ref_grads = torch.autograd.grad((ref * w).sum(), [xs, *[bn.weight for bn in separate],
                                                       *[bn.bias for bn in separate]])
    torch.testing.assert_close(grads[0], ref_grads[0])
    # the shared parameters' gradient is the sum of the workers' gradients (the loss is a sum)
    torch.testing.assert_close(grads[1], sum(ref_grads[1:1 + workers]))
    torch.testing.assert_close(grads[2], sum(ref_grads[1 + workers:]))
    # running statistics: the average of the workers' running statistics
    torch.testing.assert_close(virtual.running_mean,
                               torch.stack([bn.running_mean for bn in separate]).mean(0))
    torch.testing.assert_close(virtual.running_var,
                               torch.stack([bn.running_var for bn in separate]).mean(0))


def test_virtual_bn_rejects_a_batch_that_is_not_whole_chunks():
    bn = build_norm("bn", 3, virtual_batch=4)
    with pytest.raises(ValueError, match="not a multiple of the per-worker batch 4"):
        bn(torch.randn(6, 3, 2, 2))


@pytest.mark.parametrize("name", ["gn", "ln", "in"])
def test_batch_independent_norms_give_each_sample_the_same_output(name):
    torch.manual_seed(0)
    norm = build_norm(name, 8, **({"groups": 2} if name == "gn" else {}))
    x = torch.randn(6, 8, 3, 3)
    together = norm(x)
    for i in range(6):
        torch.testing.assert_close(together[i:i + 1], norm(x[i:i + 1]))


# ---- GN's special cases and the registry ----------------------------------------------------
def test_gn_with_one_group_is_ln_and_with_one_channel_per_group_is_in():
    torch.manual_seed(0)
    x = torch.randn(3, 8, 4, 4)
    pairs = [(build_norm("gn", 8, groups=1), build_norm("ln", 8)),
             (build_norm("gn", 8, groups=8), build_norm("in", 8)),
             (build_norm("gn", 8, group_channels=8), build_norm("ln", 8)),
             (build_norm("gn", 8, group_channels=1), build_norm("in", 8))]
    for gn, other in pairs:
        for m in (gn, other):
            with torch.no_grad():
                m.weight.copy_(torch.linspace(0.5, 1.5, 8))
                m.bias.copy_(torch.linspace(-1, 1, 8))
        torch.testing.assert_close(gn(x), other(x), rtol=0, atol=0)


def test_gn_group_channels_sets_the_number_of_groups():
    assert build_norm("gn", 64, group_channels=16).num_groups == 4
    assert build_norm("gn", 64, groups=32).num_groups == 32
    with pytest.raises(NormConfigError, match="groups=32 does not divide 16 channels"):
        build_norm("gn", 16, groups=32)
    with pytest.raises(NormConfigError, match="group_channels=3 does not divide 16"):
        build_norm("gn", 16, group_channels=3)


def test_ln_and_in_have_per_channel_affine():
    for name in ("ln", "in"):
        norm = build_norm(name, 7)
        assert isinstance(norm, GroupNorm2d) and norm.weight.shape == (7,)
        assert norm.bias.shape == (7,) and norm.eps == EPS
    assert build_norm("ln", 7).num_groups == 1 and build_norm("in", 7).num_groups == 7


def test_unknown_norm_lists_the_known_ones():
    with pytest.raises(NormConfigError) as error:
        build_norm("batchnorm", 8)
    for name in NORMS:
        assert name in str(error.value)


def test_unknown_option_is_refused_with_the_allowed_ones():
    with pytest.raises(NormConfigError, match="does not take option.*grups.*groups, "
                                              "group_channels, eps"):
        build_norm("gn", 8, grups=2)


def test_bn_is_a_batchnorm_with_eps_1e5():
    bn = build_norm("bn", 8)
    assert isinstance(bn, VirtualBatchNorm2d) and isinstance(bn, nn.BatchNorm2d)
    assert bn.eps == EPS and bn.track_running_stats


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_norm_yaml_defaults_equal_the_library_defaults(path):
    # Configs are the source of truth for the CLI; the library's keyword defaults must agree so
    # that `build_norm(name, c)` and `python run.py norm=name` build the same layer. Variants
    # (gn8) may change options, but only options the norm has.
    config = compose_config([f"norm={path.stem}"])["norm"]
    name = config.pop("name")
    assert config.keys() == norm_options(name).keys()
    if name == path.stem:
        assert config == norm_options(name)


def test_activation_registry():
    assert isinstance(build_activation("prelu"), nn.PReLU)
    assert build_activation("prelu") is not build_activation("prelu")
    with pytest.raises(NormConfigError, match="unknown act 'swish'.*relu, leaky_relu, prelu"):
        build_activation("swish")


@pytest.mark.parametrize("name", ["bn", "gn"])
def test_statistics_stay_fp32_under_cpu_bf16_autocast(name):
    # autocast runs some reductions (vecdot) in bf16; the norms' statistics must not be: given
    # bf16 inputs, the per-worker variances (bn) and outputs (gn) match float64 on the same
    # (bf16-rounded) values to fp32 accuracy, not bf16's 4e-3.
    # The inputs are 256 or 258 (both exact in bf16, whose spacing there is 2): mean ~257,
    # variance ~1. Statistics accumulated in bf16 cannot resolve the mean (a running sum or a
    # running mean rounds to a multiple of 2), so the normalized output, +-1 in float64, would
    # be off by about 1 (measured with a bf16 cumulative sum: 1.09), far outside bf16 rounding.
    torch.manual_seed(0)
    x = (256 + 2 * torch.randint(0, 2, (8, 16, 6, 6))).bfloat16()
    layer = (VirtualBatchNorm2d(16, virtual_batch=4) if name == "bn"
             else GroupNorm2d(4, 16))
    reference = copy.deepcopy(layer).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    expected = reference(x.double())
    if name == "bn":
        torch.testing.assert_close(layer.running_var.double(), reference.running_var,
                                   rtol=1e-6, atol=1e-7)
    # the output itself is bf16 (autocast's choice for what follows); compare at bf16 rounding
    torch.testing.assert_close(out.double(), expected, rtol=8e-3, atol=8e-3)
