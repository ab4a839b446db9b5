"""The norm zoo: BRN, SyncBN, WS, FRN, EvoNorm and BN evaluation (issue 3).

Every layer is checked against an independent float64 reference written from its paper's
equations (values, gradients, running statistics, eval mode), plus gradcheck on small shapes and
the invariances: batch-independent layers treat each sample alone, batch-dependent layers respect
virtual-worker chunks. Then the models (activation replaced, WS), the config refusals, Precise BN,
evaluation with batch statistics, and SyncBN across two processes.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from conftest import compose_config, run_two_processes
from normbench.bn_eval import (PRECISE_BN_EPOCH_OFFSET, batch_statistics, dedicated_epoch,
                               precise_statistics, recompute_population_statistics,
                               statistics_batch)
from normbench.config import ConfigError, validate_config
from normbench.evaluation import batches_of_whole_chunks, evaluate, evaluate_epoch
from normbench.models import ConvNormAct, build_model, norm_input_shapes
from normbench.norms import (NORMS, BatchRenorm2d, BatchStatistics, EvoNormB0, EvoNormS0,
                             FilterResponseNorm2d, NormConfigError, SyncBatchNorm2d, WSConv2d,
                             build_norm, merge_moments, norm_options, norm_spec, set_total_steps)
from normbench.train import Trainer

CONF = Path(__file__).parents[1] / "conf" / "norm"
EPS = 1e-5
F64 = torch.float64


# ---- references (float64, straight from the papers' equations) -------------------------------
def per_channel(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


def reference_bn(x, gamma, beta, eps=EPS):
    """Ioffe & Szegedy 2015 on one worker's batch: biased variance over (N, H, W)."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * per_channel(gamma) + per_channel(beta)


def reference_brn(x, gamma, beta, mu, sigma, r_max, d_max, eps=EPS):
    """Ioffe 2017, Algorithm 1, on one worker's batch; returns y, mu_B, sigma_B."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = torch.sqrt(((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True) + eps)
    r = (std / per_channel(sigma)).clamp(1 / r_max, r_max).detach()
    d = ((mean - per_channel(mu)) / per_channel(sigma)).clamp(-d_max, d_max).detach()
    x_hat = (x - mean) / std * r + d
    return x_hat * per_channel(gamma) + per_channel(beta), mean.flatten(), std.flatten()


def reference_frn(x, gamma, beta, tau, eps=1e-6):
    """Singh & Krishnan 2019: nu2 = mean of x^2 over H, W; y = gamma x / sqrt(nu2 + eps) + beta;
    z = max(y, tau)."""
    nu2 = (x ** 2).mean(dim=(2, 3), keepdim=True)
    y = x / torch.sqrt(nu2 + eps) * per_channel(gamma) + per_channel(beta)
    return y if tau is None else torch.max(y, per_channel(tau))


def reference_evonorm_s0(x, v, gamma, beta, groups, eps=EPS):
    """Liu et al. 2020: x * sigmoid(v1 x) / sqrt(s2_{c/g,h,w}(x) + eps) * gamma + beta."""
    n, c, h, w = x.shape
    g = x.reshape(n, groups, -1)
    var = ((g - g.mean(dim=2, keepdim=True)) ** 2).mean(dim=2, keepdim=True)
    std = torch.sqrt(var + eps).expand_as(g).reshape(n, c, h, w)
    return x * torch.sigmoid(per_channel(v) * x) / std * per_channel(gamma) + per_channel(beta)


def reference_evonorm_b0(x, v, gamma, beta, batch_var, eps=EPS):
    """Liu et al. 2020: x / max(sqrt(s2_b + eps), v1 x + sqrt(s2_{h,w}(x) + eps)) * gamma + beta,
    ``batch_var`` per channel (the batch's in training, the running one in eval mode)."""
    instance_var = ((x - x.mean(dim=(2, 3), keepdim=True)) ** 2).mean(dim=(2, 3), keepdim=True)
    left = torch.sqrt(per_channel(batch_var) + eps)
    right = per_channel(v) * x + torch.sqrt(instance_var + eps)
    return x / torch.max(left, right) * per_channel(gamma) + per_channel(beta)


def biased_var(x):
    return ((x - x.mean(dim=(0, 2, 3), keepdim=True)) ** 2).mean(dim=(0, 2, 3))


def randomize(module: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial parameters: gamma around 1, beta, v, tau around 0 (so every term matters)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight") or name == "v":
                p.copy_(torch.rand(p.shape, generator=generator, dtype=p.dtype) + 0.5)
            elif name in ("bias", "tau"):
                p.copy_(torch.rand(p.shape, generator=generator, dtype=p.dtype) - 0.5)
    return module


def outputs_and_grads(fn, x, params, weights=None):
    """Outputs and the gradients of a random linear loss w.r.t. the input and ``params``."""
    x = x.clone().requires_grad_(True)
    y = fn(x)
    if weights is None:
        weights = torch.randn_like(y)
    grads = torch.autograd.grad((y * weights).sum(), [x, *params])
    return y.detach(), grads, weights


def assert_all_close(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e)


def sample_input(shape=(6, 4, 3, 3), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=F64) * 2 + 0.5


# ---- Batch Renormalization --------------------------------------------------------------------
RUN = 100  # training steps of the run in the BRN tests below


def brn_in_full_relaxation(channels=4, virtual_batch=None) -> BatchRenorm2d:
    brn = randomize(build_norm("brn", channels, virtual_batch=virtual_batch, warmup_until=0.1,
                               r_max_reached_at=0.3, d_max_reached_at=0.2)).double()
    set_total_steps(brn, RUN)
    with torch.no_grad():
        brn.steps.fill_(30)
        # moving averages far enough from the batch's for some r and d to clip, near for others
        brn.running_mean.copy_(torch.tensor([0.5, 3.0, -2.0, 0.4])[:channels])
        brn.running_std.copy_(torch.tensor([2.0, 0.5, 6.0, 2.1])[:channels])
    return brn


def test_brn_matches_algorithm_1_per_worker_with_gradients_and_moving_averages():
    workers, batch = 3, 2
    brn = brn_in_full_relaxation(virtual_batch=batch)
    mu0, sigma0 = brn.running_mean.clone(), brn.running_std.clone()
    x = sample_input((workers * batch, 4, 3, 3))
    ours, grads, weights = outputs_and_grads(brn, x, [brn.weight, brn.bias])

    xr = x.clone().requires_grad_(True)
    gamma = brn.weight.detach().clone().requires_grad_(True)
    beta = brn.bias.detach().clone().requires_grad_(True)
    pieces = [reference_brn(xr[k * batch:(k + 1) * batch], gamma, beta, mu0, sigma0, 1.5, 0.5)
              for k in range(workers)]
    ref = torch.cat([y for y, _, _ in pieces])
    torch.testing.assert_close(ours, ref.detach())
    assert_all_close(grads, torch.autograd.grad((ref * weights).sum(), [xr, gamma, beta]))

    # the clipping did bite somewhere and not everywhere, so the checks above mean something
    ratios = torch.stack([std for _, _, std in pieces]) / sigma0
    assert ((ratios > 1.5) | (ratios < 1 / 1.5)).any() and ((ratios < 1.5) & (ratios > 1 / 1.5)).any()

    # moving averages at rate 0.01 of the mean over workers of mu_B and sigma_B; one more step
    mean_mu = torch.stack([m for _, m, _ in pieces]).mean(0).detach()
    mean_sigma = torch.stack([s for _, _, s in pieces]).mean(0).detach()
    torch.testing.assert_close(brn.running_mean, mu0 + 0.01 * (mean_mu - mu0))
    torch.testing.assert_close(brn.running_std, sigma0 + 0.01 * (mean_sigma - sigma0))
    assert brn.steps.item() == 31


def test_brn_eval_mode_uses_moving_mean_and_std():
    brn = brn_in_full_relaxation().eval()
    x = sample_input()
    expected = ((x - per_channel(brn.running_mean)) / per_channel(brn.running_std)
                * per_channel(brn.weight) + per_channel(brn.bias))
    torch.testing.assert_close(brn(x), expected.detach())


def reference_brn_limits(step, total, r_max, d_max, warmup_until, r_max_reached_at,
                         d_max_reached_at):
    """Ioffe 2017's schedule in fractions of the run, in float64: plain BN (1, 0) until
    warmup_until, then linear to (r_max, d_max) at the fractions where each is reached."""
    done = step / total

    def relaxed(start, limit, reached_at):
        if done <= warmup_until:
            return start
        if done >= reached_at:
            return limit
        return start + (limit - start) * (done - warmup_until) / (reached_at - warmup_until)
    return relaxed(1.0, r_max, r_max_reached_at), relaxed(0.0, d_max, d_max_reached_at)


def test_brn_schedule_plain_bn_then_linear_relaxation_in_fractions_of_the_run():
    options = {"r_max": 3.0, "d_max": 5.0, "warmup_until": 0.1, "r_max_reached_at": 0.3,
               "d_max_reached_at": 0.2}
    brn = build_norm("brn", 4, **options)
    set_total_steps(brn, 1000)
    for step in (0, 50, 100, 101, 150, 173, 200, 250, 299, 300, 1000, 1500):
        brn.steps.fill_(step)
        torch.testing.assert_close(
            torch.stack(brn.clip_limits()).double(),
            torch.tensor(reference_brn_limits(step, 1000, **options), dtype=F64), msg=str(step))
    immediate = build_norm("brn", 4, warmup_until=0.1, r_max_reached_at=0.1,
                           d_max_reached_at=0.1)
    set_total_steps(immediate, 1000)
    immediate.steps.fill_(99)
    assert [v.item() for v in immediate.clip_limits()] == [1.0, 0.0]
    immediate.steps.fill_(100)
    assert [v.item() for v in immediate.clip_limits()] == [1.5, 0.5]


def test_brn_schedule_is_the_same_at_batch_32_and_2_for_runs_of_the_same_epochs():
    # the same epochs of the same data: batch 2 takes 16 times the steps of batch 32. Each run
    # relaxes r_max and d_max over the same fractions of itself, from the paper's defaults.
    steps_per_epoch_32, epochs = 25, 40
    runs = {}
    for batch in (32, 2):
        brn = build_norm("brn", 4, virtual_batch=batch)
        steps = epochs * steps_per_epoch_32 * 32 // batch
        set_total_steps(brn, steps)
        limits = []
        for epoch in range(epochs + 1):
            brn.steps.fill_(epoch * steps // epochs)
            limits.append(torch.stack(brn.clip_limits()))
        runs[batch] = torch.stack(limits)
    torch.testing.assert_close(runs[32], runs[2])
    defaults = norm_options("brn")
    expected = [reference_brn_limits(epoch, epochs, defaults["r_max"], defaults["d_max"],
                                     defaults["warmup_until"], defaults["r_max_reached_at"],
                                     defaults["d_max_reached_at"]) for epoch in range(epochs + 1)]
    torch.testing.assert_close(runs[2].double(), torch.tensor(expected, dtype=F64))
    # a short run (1000 steps at batch 32) is not plain BN throughout: relaxed by its end
    assert runs[32][-1].tolist() == [1.5, 0.5] and runs[32][epochs // 2].tolist() == [1.5, 0.5]
    assert runs[32][1].tolist() == [1.0, 0.0]  # the first 4% of the run is plain BN


def test_brn_during_warmup_is_plain_bn_whatever_its_moving_averages():
    brn = brn_in_full_relaxation(virtual_batch=3)
    brn.steps.fill_(0)
    bn = build_norm("bn", 4, virtual_batch=3).double()
    bn.load_state_dict({"weight": brn.weight, "bias": brn.bias}, strict=False)
    x = sample_input()
    torch.testing.assert_close(brn(x), bn(x))


def test_brn_counts_its_steps_in_training_and_a_resumed_layer_continues_the_schedule():
    brn = randomize(build_norm("brn", 4, virtual_batch=2)).double()
    set_total_steps(brn, 50)
    for step in range(20):
        brn(sample_input(seed=step))
    assert brn.steps.item() == 20
    resumed = build_norm("brn", 4, virtual_batch=2).double()
    resumed.load_state_dict(brn.state_dict())  # what a checkpoint carries
    set_total_steps(resumed, 50)  # what the trainer does on every start
    for layer in (brn, resumed):
        layer(sample_input(seed=20))
    assert resumed.steps.item() == 21
    assert_all_close(resumed.clip_limits(), brn.clip_limits())
    torch.testing.assert_close(resumed.state_dict(), brn.state_dict())
    # 21 of 50 steps, past d_max's 20%, short of r_max's 30%: (1 + 0.5 * 0.38 / 0.26, 0.5)
    torch.testing.assert_close(torch.stack(brn.clip_limits()),
                               torch.tensor(reference_brn_limits(21, 50, 1.5, 0.5, 0.04, 0.3, 0.2),
                                            dtype=F64))


def test_brn_trained_without_the_runs_length_is_an_error_naming_the_call():
    model = build_model("resnet8", num_classes=4, norm="brn", batch=2, stem="cifar")
    with pytest.raises(NormConfigError, match=r"BatchRenorm2d at layer stem\.0\.norm: the run's "
                       r"number of training steps is not set .* call "
                       r"normbench\.norms\.set_total_steps\(model, steps\)"):
        model(torch.randn(4, 3, 8, 8))
    set_total_steps(model, 10)
    model(torch.randn(4, 3, 8, 8))
    with pytest.raises(ValueError, match="total_steps=0 is not allowed"):
        set_total_steps(model, 0)


def test_the_trainer_gives_brn_the_runs_length(tmp_path):
    cfg = compose_config(["norm=brn", "model=resnet8", "dataset=synthetic",
                          "dataset.train_size=64", "dataset.test_size=16",
                          "dataset.image_size=8", "batch=4", "workers=2", "epochs=3",
                          "wandb.mode=disabled", "progress=false"])
    trainer = Trainer(cfg, folder=None)
    layers = [m for m in trainer.model.modules() if isinstance(m, BatchRenorm2d)]
    assert layers and {m.total_steps for m in layers} == {3 * 64 // 8}


def test_brn_step_counter_is_in_the_state_dict_and_frozen_mode_writes_nothing():
    brn = brn_in_full_relaxation(virtual_batch=2)
    assert "steps" in brn.state_dict()
    state = copy.deepcopy(brn.state_dict())
    brn.stats_mode = "frozen"
    frozen_out = brn(sample_input())
    for key, value in brn.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    brn.stats_mode = "update"
    torch.testing.assert_close(brn(sample_input()), frozen_out)  # same computation, then writes
    assert brn.steps.item() == 31
    restored = build_norm("brn", 4)
    restored.load_state_dict(brn.state_dict())
    assert restored.steps.item() == 31


def test_brn_options_are_checked():
    with pytest.raises(NormConfigError, match="brn: r_max_reached_at=0.05 is not allowed with "
                                              "warmup_until=0.1; it is a fraction of the run"):
        build_norm("brn", 4, warmup_until=0.1, r_max_reached_at=0.05)
    # a step count where a fraction is expected (the old meaning of these options)
    with pytest.raises(NormConfigError, match="brn: d_max_reached_at=25000 is not allowed"):
        build_norm("brn", 4, d_max_reached_at=25000)
    with pytest.raises(NormConfigError, match="brn: warmup_until=-0.1 is not allowed"):
        build_norm("brn", 4, warmup_until=-0.1)
    with pytest.raises(NormConfigError, match="brn: warmup_until='abc' is not allowed; it must "
                                              "be a number"):
        build_norm("brn", 4, warmup_until="abc")
    with pytest.raises(NormConfigError, match="r_max must be >= 1"):
        build_norm("brn", 4, r_max=0.5)
    with pytest.raises(NormConfigError, match="does not take option.* warmup_steps"):
        build_norm("brn", 4, warmup_steps=5000)


# ---- virtual workers: chunked pass == separate workers, for every batch-dependent layer -------
@pytest.mark.parametrize("name", ["bn", "brn", "evonorm_b0"])
def test_batch_dependent_layers_respect_virtual_worker_chunks(name):
    workers, batch = 3, 2
    virtual = randomize(build_norm(name, 4, virtual_batch=batch)).double()
    if name == "brn":
        virtual = brn_in_full_relaxation(virtual_batch=batch)
    initial = copy.deepcopy(virtual.state_dict())
    x = sample_input((workers * batch, 4, 3, 3))
    out, grads, weights = outputs_and_grads(virtual, x, [virtual.weight, virtual.bias])

    separate = [copy.deepcopy(virtual) for _ in range(workers)]
    xs = x.clone().requires_grad_(True)
    outs = []
    for k, layer in enumerate(separate):
        layer.load_state_dict(initial)
        layer.virtual_batch = None
        outs.append(layer(xs[k * batch:(k + 1) * batch]))
    ref = torch.cat(outs)
    torch.testing.assert_close(out, ref.detach())
    params = [p for layer in separate for p in (layer.weight, layer.bias)]
    ref_grads = torch.autograd.grad((ref * weights).sum(), [xs, *params])
    torch.testing.assert_close(grads[0], ref_grads[0])
    # the shared parameters' gradient is the sum of the workers' gradients (the loss is a sum)
    torch.testing.assert_close(grads[1], sum(ref_grads[1::2]))
    torch.testing.assert_close(grads[2], sum(ref_grads[2::2]))
    for buffer in virtual.running_stat_names:  # the average of the workers' running statistics
        torch.testing.assert_close(getattr(virtual, buffer),
                                   torch.stack([getattr(m, buffer) for m in separate]).mean(0))


# ---- SyncBN -----------------------------------------------------------------------------------
def test_syncbn_on_one_process_is_bn_over_the_whole_batch_ignoring_virtual_batch():
    sync = randomize(build_norm("syncbn", 4, virtual_batch=2)).double()
    assert isinstance(sync, SyncBatchNorm2d) and sync.virtual_batch is None
    bn = nn.BatchNorm2d(4).double()
    bn.load_state_dict(sync.state_dict())
    x = sample_input((8, 4, 3, 3))
    ours, grads, weights = outputs_and_grads(sync, x, [sync.weight, sync.bias])
    ref, ref_grads, _ = outputs_and_grads(bn, x, [bn.weight, bn.bias], weights)
    torch.testing.assert_close(ours, ref)
    assert_all_close(grads, ref_grads)
    torch.testing.assert_close(sync.running_var, bn.running_var)


def part_moments(parts):
    """(counts, means, M2s) of each part's channels over (N, H, W), two-pass."""
    counts = torch.tensor([p.numel() // p.shape[1] for p in parts], dtype=parts[0].dtype)
    means = torch.stack([p.mean(dim=(0, 2, 3)) for p in parts])
    m2s = torch.stack([((p - m.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3))
                       for p, m in zip(parts, means)])
    return counts, means, m2s


def test_merged_moments_are_the_whole_batchs_in_float64_and_stay_exact_far_from_zero():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, 2, 2, generator=generator, dtype=F64) * 2 + 600  # |mean| / std 300
    parts = list(x.split([1, 4, 5]))  # unequal parts: each must weigh by its count
    n, mean, m2 = merge_moments(*part_moments(parts))
    assert n.item() == 40
    torch.testing.assert_close(mean, x.mean(dim=(0, 2, 3)), rtol=1e-15, atol=0)
    torch.testing.assert_close(m2, biased_var(x) * 40, rtol=1e-12, atol=0)

    # float32: the merge keeps the variance to float32 rounding, where the sums of x and x^2
    # (the former SyncBN) lose it
    n32, _, m2_32 = merge_moments(*part_moments([p.float() for p in parts]))
    merged_error = ((m2_32.double() / 40 - biased_var(x)) / biased_var(x)).abs().max().item()
    x32 = x.float()
    sums_var = (x32 * x32).mean(dim=(0, 2, 3)) - x32.mean(dim=(0, 2, 3)) ** 2
    sums_error = ((sums_var.double() - biased_var(x)) / biased_var(x)).abs().max().item()
    assert merged_error < 1e-4 < 1e-2 < sums_error, (merged_error, sums_error)


SYNC_BATCH, SYNC_SHAPE = 3, (4, 3, 3)


def _syncbn_data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2 * SYNC_BATCH, *SYNC_SHAPE, generator=generator, dtype=F64) * 2 + 1
    return x, torch.randn(x.shape, generator=generator, dtype=F64)


def _syncbn_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        x_all, weights = _syncbn_data()
        layer = randomize(build_norm("syncbn", SYNC_SHAPE[0])).double()
        mine = slice(rank * SYNC_BATCH, (rank + 1) * SYNC_BATCH)
        x = x_all[mine].clone().requires_grad_(True)
        y = layer(x)
        (y * weights[mine]).sum().backward()
        for p in layer.parameters():  # the total gradient, as DDP would sum it (before / world)
            dist.all_reduce(p.grad)
        torch.save({"y": y.detach(), "x_grad": x.grad, "weight_grad": layer.weight.grad,
                    "bias_grad": layer.bias.grad, "running_mean": layer.running_mean,
                    "running_var": layer.running_var}, Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()




def test_syncbn_across_two_gloo_processes_equals_bn_over_the_concatenated_batch():
    with tempfile.TemporaryDirectory() as tmp:
        run_two_processes(_syncbn_worker, str(Path(tmp) / "init"), tmp)
        results = [torch.load(Path(tmp) / f"{rank}.pt") for rank in range(2)]
    x, weights = _syncbn_data()
    bn = randomize(nn.BatchNorm2d(SYNC_SHAPE[0])).double()
    ref, (x_grad, w_grad, b_grad), _ = outputs_and_grads(bn, x, [bn.weight, bn.bias], weights)
    torch.testing.assert_close(torch.cat([r["y"] for r in results]), ref)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in results]), x_grad)
    for r in results:
        torch.testing.assert_close(r["weight_grad"], w_grad)
        torch.testing.assert_close(r["bias_grad"], b_grad)
        torch.testing.assert_close(r["running_mean"], bn.running_mean)
        torch.testing.assert_close(r["running_var"], bn.running_var)


# ---- FRN, EvoNorm ------------------------------------------------------------------------------
def test_frn_with_tlu_matches_the_paper_values_and_gradients():
    frn = randomize(build_norm("frn", 4)).double()
    x = sample_input()
    ours, grads, weights = outputs_and_grads(frn, x, [frn.weight, frn.bias, frn.tau])
    params = [p.detach().clone().requires_grad_(True) for p in (frn.weight, frn.bias, frn.tau)]
    xr = x.clone().requires_grad_(True)
    ref = reference_frn(xr, *params)
    assert (ref.detach() == params[2].detach().view(1, -1, 1, 1)).any()  # TLU clips somewhere
    torch.testing.assert_close(ours, ref.detach())
    assert_all_close(grads, torch.autograd.grad((ref * weights).sum(), [xr, *params]))
    frn.eval()  # no running statistics: eval mode computes the same
    torch.testing.assert_close(frn(x), ref.detach())


def test_frn_without_activation_has_no_tlu_and_learnable_eps_adds_a_learned_part():
    plain = randomize(build_norm("frn", 4, with_activation=False)).double()
    assert plain.tau is None
    x = sample_input()
    torch.testing.assert_close(plain(x), reference_frn(x, plain.weight, plain.bias, None))
    learned = randomize(build_norm("frn", 4, learnable_eps=True)).double()
    with torch.no_grad():
        learned.eps_learned.fill_(-0.3)  # used as |eps_learned|
    expected = reference_frn(x, learned.weight, learned.bias, learned.tau, eps=1e-6 + 0.3)
    torch.testing.assert_close(learned(x), expected)
    learned(x).sum().backward()
    assert learned.eps_learned.grad is not None and learned.eps_learned.grad != 0


# FRN's learned eps exists for 1x1 maps (Singh & Krishnan 2019, section 3.3): ResNet-18's ImageNet
# stem on 32x32 images leaves a 1x1 map in the last stage.
ONE_BY_ONE = ["model=resnet50", "model.stem=imagenet", "dataset.image_size=32"]


def test_frn_with_learnable_eps_on_a_1x1_map_matches_the_paper_values_and_gradients():
    layer = randomize(build_norm("frn", 4, learnable_eps=True)).double()
    with torch.no_grad():
        layer.eps_learned.fill_(-0.3)  # used as |eps_learned|
    x = sample_input((6, 4, 1, 1))
    params = [layer.weight, layer.bias, layer.tau, layer.eps_learned]
    ours, grads, weights = outputs_and_grads(layer, x, params)

    gamma, beta, tau = (p.detach().clone().requires_grad_(True) for p in params[:3])
    eps_learned = torch.tensor(-0.3, dtype=F64, requires_grad=True)
    xr = x.clone().requires_grad_(True)
    ref = reference_frn(xr, gamma, beta, tau, eps=1e-6 + eps_learned.abs())
    # on a 1x1 map nu2 = x^2: x_hat = x / sqrt(x^2 + eps), smooth, not sign(x)
    torch.testing.assert_close(ref, torch.max(xr / torch.sqrt(xr ** 2 + 1e-6 + 0.3)
                                              * per_channel(gamma) + per_channel(beta),
                                              per_channel(tau)))
    torch.testing.assert_close(ours, ref.detach())
    assert_all_close(grads, torch.autograd.grad((ref * weights).sum(),
                                                [xr, gamma, beta, tau, eps_learned]))
    assert grads[0].abs().max() > 0.1 and grads[4] != 0  # the input and eps get a gradient


def test_frn_with_learnable_eps_is_allowed_on_1x1_maps_and_without_it_is_refused():
    validate_config(compose_config(["norm=frn", "norm.learnable_eps=true", *ONE_BY_ONE]))
    with pytest.raises(ConfigError, match=r"norm=frn at layer stages\.3\.\d\.conv\d\.norm would "
                       r"normalize a single value \(input \d+x1x1.*use norm\.learnable_eps=true"):
        validate_config(compose_config(["norm=frn", *ONE_BY_ONE]))


def test_frn_with_learnable_eps_trains_a_model_with_1x1_maps():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=4, norm="frn", norm_options={"learnable_eps": True},
                        stem="imagenet", width=0.25)
    shapes = norm_input_shapes(model, 32)
    assert (shapes["stages.3.1.conv2.norm"][1:]) == (1, 1)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    eps_before = {name: p.item() for name, p in model.named_parameters()
                  if name.endswith("eps_learned")}
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.8 * losses[0]
    last = model.stages[3][1].conv2.norm  # a 1x1 map: its learned eps moved
    assert last.eps_learned.item() != eps_before["stages.3.1.conv2.norm.eps_learned"]


# ---- one value per statistic: a clear error, not a ZeroDivisionError ---------------------------
@pytest.mark.parametrize("norm,batch,images", [("bn", 1, 2), ("bn", None, 1), ("brn", 1, 2),
                                               ("syncbn", None, 1)])
def test_one_value_per_statistic_in_training_is_an_error_naming_layer_batch_and_remedy(
        norm, batch, images):
    # ResNet-18's ImageNet stem leaves 32x32 images a 1x1 map in the last stage: one image per
    # worker gives BN one value per statistic there
    model = build_model("resnet18", num_classes=4, norm=norm, batch=batch, stem="imagenet",
                        width=0.25)
    set_total_steps(model, 10)
    x = torch.randn(images, 3, 32, 32)
    with pytest.raises(NormConfigError, match=(
            r"at layer stages\.3\.0\.conv1\.norm would normalize a single value per channel in "
            r"training: batch=1 image per worker on a 1x1 map \(input 128x1x1: the images are "
            r"too small for this model's stem\); choose batch >= 2 images per worker, larger "
            r"images or a stem that keeps larger maps \(stem='cifar' for 32x32 images\), or a "
            r"batch-independent norm such as gn")):
        model(x)
    model.eval()(x)  # evaluation uses the running statistics: any batch
    model.train()(torch.randn(2 * images, 3, 64, 64))  # 2x2 maps: 4 values per statistic


def test_syncbn_on_a_1x1_map_counts_the_steps_images_not_one_workers():
    # syncbn's statistics cover batch * workers = 2 images: two values per statistic, allowed
    # (it was refused as if one worker's single image were its statistics batch)
    validate_config(compose_config(["norm=syncbn", "batch=1", "workers=2", *ONE_BY_ONE]))


def test_evonorm_s0_matches_the_paper_values_and_gradients():
    s0 = randomize(build_norm("evonorm_s0", 8, groups=2)).double()
    x = sample_input((3, 8, 3, 3))
    params = [s0.v, s0.weight, s0.bias]
    ours, grads, weights = outputs_and_grads(s0, x, params)
    ref_params = [p.detach().clone().requires_grad_(True) for p in params]
    xr = x.clone().requires_grad_(True)
    ref = reference_evonorm_s0(xr, *ref_params, groups=2)
    torch.testing.assert_close(ours, ref.detach())
    assert_all_close(grads, torch.autograd.grad((ref * weights).sum(), [xr, *ref_params]))


def test_evonorm_s0_groups_must_divide_the_channels_naming_the_layer():
    with pytest.raises(NormConfigError, match="evonorm_s0: groups=32 does not divide 16 channels"):
        build_norm("evonorm_s0", 16)
    with pytest.raises(NormConfigError, match="at layer stem: evonorm_s0: groups=32 does not "
                                              "divide 16 channels"):
        build_model("resnet20", num_classes=10, norm="evonorm_s0", stem="cifar")


def test_evonorm_b0_train_eval_and_running_variance_match_the_paper():
    workers, batch = 2, 3
    b0 = randomize(build_norm("evonorm_b0", 4, virtual_batch=batch)).double()
    x = sample_input((workers * batch, 4, 3, 3))
    params = [b0.v, b0.weight, b0.bias]
    ours, grads, weights = outputs_and_grads(b0, x, params)
    ref_params = [p.detach().clone().requires_grad_(True) for p in params]
    xr = x.clone().requires_grad_(True)
    chunks = [xr[k * batch:(k + 1) * batch] for k in range(workers)]
    ref = torch.cat([reference_evonorm_b0(c, *ref_params, batch_var=biased_var(c))
                     for c in chunks])
    torch.testing.assert_close(ours, ref.detach())
    assert_all_close(grads, torch.autograd.grad((ref * weights).sum(), [xr, *ref_params]))
    # running variance: moving average (rate 0.1) of the biased batch variances, from 1
    chunk_vars = torch.stack([biased_var(c.detach()) for c in chunks]).mean(0)
    torch.testing.assert_close(b0.running_var, 0.9 + 0.1 * chunk_vars)
    b0.eval()
    torch.testing.assert_close(
        b0(x), reference_evonorm_b0(x, *params, batch_var=b0.running_var).detach())


@pytest.mark.parametrize("name", ["evonorm_b0", "evonorm_s0"])
def test_evonorm_without_activation_is_the_affine_part_only(name):
    layer = randomize(build_norm(name, 8, with_activation=False, virtual_batch=None)
                      if name == "evonorm_b0" else build_norm(name, 8, with_activation=False))
    assert layer.v is None and layer.values_per_statistic(2, 8, 4, 4) is None
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(layer(x), x * per_channel(layer.weight) + per_channel(layer.bias))


@pytest.mark.parametrize("name,options", [("frn", {}), ("evonorm_s0", {"groups": 2}),
                                          ("frn", {"learnable_eps": True})])
def test_batch_independent_layers_give_each_sample_the_same_output(name, options):
    layer = randomize(build_norm(name, 8, **options))
    x = torch.randn(5, 8, 3, 3)
    together = layer(x)
    for i in range(5):
        torch.testing.assert_close(together[i:i + 1], layer(x[i:i + 1]))


def gradcheck_layers():
    full = brn_in_full_relaxation(virtual_batch=2)
    with torch.no_grad():  # every r and d clipped: constants, as the gradient assumes
        full.running_std.fill_(1e-3)
        full.running_mean.fill_(100.0)
    warmup = brn_in_full_relaxation(virtual_batch=2)
    warmup.steps.fill_(0)
    return {
        "brn_clipped": full,
        "brn_warmup": warmup,
        "frn": build_norm("frn", 4),
        "frn_learnable_eps": build_norm("frn", 4, learnable_eps=True),
        "evonorm_s0": build_norm("evonorm_s0", 4, groups=2),
        "evonorm_b0": build_norm("evonorm_b0", 4, virtual_batch=2),
        "evonorm_b0_eval": build_norm("evonorm_b0", 4).eval(),
    }


@pytest.mark.parametrize("name", list(gradcheck_layers()))
def test_gradcheck_on_small_shapes(name):
    layer = randomize(gradcheck_layers()[name]).double()
    x = sample_input((4, 4, 2, 2)).requires_grad_(True)
    names = [name for name, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]
    buffers = copy.deepcopy(dict(layer.named_buffers()))

    def fn(x, *ps):
        with torch.no_grad():  # each evaluation from the same running statistics and step
            for name, buffer in layer.named_buffers():
                buffer.copy_(buffers[name])
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))
    assert torch.autograd.gradcheck(fn, (x, *params))


# ---- GN's special cases, exactly ---------------------------------------------------------------
@pytest.mark.parametrize("gn_options,other", [({"groups": 1}, "ln"), ({"groups": 6}, "in"),
                                              ({"group_channels": 6}, "ln"),
                                              ({"group_channels": 1}, "in")])
def test_gn_with_one_group_or_one_channel_per_group_is_ln_or_in_exactly(gn_options, other):
    gn, ref = randomize(build_norm("gn", 6, **gn_options)), build_norm(other, 6)
    ref.load_state_dict(gn.state_dict())
    x = torch.randn(3, 6, 4, 4) * 3 + 1
    ours, grads, weights = outputs_and_grads(gn, x, [gn.weight, gn.bias])
    theirs, their_grads, _ = outputs_and_grads(ref, x, [ref.weight, ref.bias], weights)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    for a, b in zip(grads, their_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- the registry ------------------------------------------------------------------------------
def test_every_norm_has_a_yaml_file_and_structural_arguments_are_not_options():
    assert {p.stem for p in CONF.glob("*.yaml")} >= set(NORMS)
    for name in NORMS:
        assert not {"virtual_batch", "apply_act"} & set(norm_options(name))
    assert {n for n, s in NORMS.items() if s.replaces_activation} == {"frn", "evonorm_b0",
                                                                     "evonorm_s0"}
    assert {n for n, s in NORMS.items() if s.batch_dependent} == {"bn", "brn", "syncbn",
                                                                 "evonorm_b0"}
    assert norm_spec("syncbn").step_statistics and not norm_spec("bn").step_statistics


def test_batch_dependent_norms_share_the_batch_statistics_machinery():
    for name, spec in NORMS.items():
        layer = build_norm(name, 8, **({"groups": 2} if name in ("gn", "evonorm_s0") else {}))
        assert isinstance(layer, BatchStatistics) == spec.batch_dependent, name


# ---- models: activation replaced, weight standardization ---------------------------------------
@pytest.mark.parametrize("norm", ["frn", "evonorm_b0", "evonorm_s0"])
def test_norms_that_are_activations_replace_the_units_activation(norm):
    model = build_model("resnet20", num_classes=10, norm=norm, stem="cifar", act="silu",
                        norm_options={"groups": 8} if norm == "evonorm_s0" else {})
    units = {n: m for n, m in model.named_modules() if isinstance(m, ConvNormAct)}
    for name, unit in units.items():
        assert list(dict(unit.named_children())) == ["conv", "norm"], name
        last_of_branch = name.endswith(".conv2") or name.endswith(".shortcut")
        assert unit.norm.apply_act == (not last_of_branch), name
        if last_of_branch:  # zero-init of the last gamma still applies
            assert name.endswith(".shortcut") or torch.all(unit.norm.weight == 0)
    blocks = [m for m in model.modules() if hasattr(m, "last_norm")]
    assert blocks and all(isinstance(b.act, nn.SiLU) for b in blocks)  # `act`: after the addition
    out = model(torch.randn(4, 3, 8, 8))
    out.sum().backward()
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("norm", ["frn", "evonorm_b0", "evonorm_s0"])
def test_norms_that_are_activations_refuse_placement_after(norm):
    with pytest.raises(NormConfigError, match=f"placement='after' is not allowed with "
                                              f"norm={norm}: .*allowed with norm={norm}: "
                                              f"placement=before"):
        build_model("resnet8", num_classes=10, norm=norm, placement="after")


def reference_standardized(weight):
    """Qiao et al. 2019: per output channel, (W - mean) / sqrt(var + eps) over in * kh * kw."""
    flat = weight.flatten(1)
    mean = flat.mean(1, keepdim=True)
    var = ((flat - mean) ** 2).mean(1, keepdim=True)
    return ((flat - mean) / torch.sqrt(var + 1e-5)).view_as(weight)


def test_ws_standardizes_each_output_channel_and_convolves_with_it():
    conv = WSConv2d(3, 5, 3, padding=1, bias=False).double()
    with torch.no_grad():
        conv.weight.normal_(0.3, 2.0)
    w = conv.standardized_weight()
    torch.testing.assert_close(w.mean(dim=(1, 2, 3)), torch.zeros(5, dtype=F64))
    torch.testing.assert_close(w.flatten(1).std(1, unbiased=False), torch.ones(5, dtype=F64),
                               atol=1e-5, rtol=0)
    x = sample_input((2, 3, 5, 5))
    weight = conv.weight.detach().clone().requires_grad_(True)
    torch.testing.assert_close(conv(x), F.conv2d(x, reference_standardized(weight), padding=1))
    assert torch.autograd.gradcheck(
        lambda x, w: torch.func.functional_call(conv, {"weight": w}, (x,)),
        (x[:1, :, :3, :3].clone().requires_grad_(True), weight))


def test_ws_turns_every_conv_of_the_units_into_a_ws_conv_and_composes_with_gn():
    torch.manual_seed(0)
    options = {"norm": "gn", "norm_options": {"groups": 4}, "stem": "cifar", "num_classes": 10}
    ws = build_model("resnet8", ws=True, **options)
    plain = build_model("resnet8", ws=False, **options)
    convs = [m for m in ws.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is WSConv2d for m in convs)
    assert all(type(m) is nn.Conv2d for m in plain.modules() if isinstance(m, nn.Conv2d))
    assert ws.state_dict().keys() == plain.state_dict().keys()
    # GN + WS = GN on convs whose weights are the standardized ones
    plain.load_state_dict(ws.state_dict())
    with torch.no_grad():
        for ours, theirs in zip(convs, [m for m in plain.modules() if isinstance(m, nn.Conv2d)]):
            theirs.weight.copy_(ours.standardized_weight())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(ws(x), plain(x))


def test_ws_without_a_norm_is_refused():
    with pytest.raises(NormConfigError, match="ws=True is not allowed with norm=none.*allowed "
                                              "with norm=none: ws=False"):
        build_model("resnet8", num_classes=10, norm="none", ws=True)


# ---- config refusals ----------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    (["norm=frn", "placement=after"],
     r"placement='after' is not allowed with norm=frn: .*allowed with norm=frn: placement=before"),
    (["norm=evonorm_b0", "placement=after"], r"placement='after' is not allowed with "
                                             r"norm=evonorm_b0"),
    (["norm=evonorm_s0", "norm.groups=8", "placement=after"],
     r"placement='after' is not allowed with norm=evonorm_s0"),
    (["norm=evonorm_s0", "model=resnet20"],
     r"at layer stem: evonorm_s0: groups=32 does not divide 16 channels"),
    (["norm=none", "ws=true"], r"ws=True is not allowed with norm=none"),
    (["ws=maybe"], r"ws='maybe' is not allowed; choose one of: true, false"),
    (["bn_eval=exact"], r"bn_eval='exact' is not allowed; choose one of: running, precise, batch"),
    (["precise_bn_samples=0"], r"precise_bn_samples=0 is not allowed; it must be an integer >= 1"),
    (["norm=brn", "batch=1"], r"batch=1 is not allowed with norm=brn: its statistics need at "
                              r"least 2 images per worker"),
    (["norm=evonorm_b0", "batch=1"], r"batch=1 is not allowed with norm=evonorm_b0"),
    (["norm=syncbn", "batch=1", "workers=1"],
     r"batch=1 with workers=1 is not allowed with norm=syncbn: its statistics cover the step's "
     r"batch \* workers images and need at least 2"),
    (["norm=brn", "norm.warmup_until=0.5", "norm.r_max_reached_at=0.3"],
     r"brn: r_max_reached_at=0.3 is not allowed with warmup_until=0.5"),
])
def test_invalid_norm_combinations_are_refused_naming_key_value_and_allowed(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(compose_config(overrides))


@pytest.mark.parametrize("overrides", [
    ["norm=brn"], ["norm=syncbn", "batch=1"], ["norm=frn"], ["norm=evonorm_b0"],
    ["norm=evonorm_s0", "norm.groups=8"], ["norm=gn", "norm.groups=8", "ws=true"],
    ["norm=bn", "bn_eval=precise"], ["norm=gn", "norm.groups=8", "bn_eval=batch"],
])
def test_valid_norm_combinations_pass(overrides):
    validate_config(compose_config(overrides))


# ---- BN evaluation --------------------------------------------------------------------------
class Batches:
    """A loader over fixed tensors: batches of ``size``; ``set_epoch`` picks a shuffle."""

    def __init__(self, images, labels, size):
        self.images, self.labels, self.size = images, labels, size
        self.epochs: list[int] = []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __iter__(self):
        order = torch.arange(len(self.images))
        if self.epochs:
            order = torch.randperm(len(order),
                                   generator=torch.Generator().manual_seed(self.epochs[-1]))
        for start in range(0, len(order), self.size):
            index = order[start:start + self.size]
            yield self.images[index], self.labels[index]


def small_model(norm: str, batch: int) -> nn.Module:
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=4, norm=norm, batch=batch, stem="cifar",
                        width=0.5, zero_init_last=False).double()
    set_total_steps(model, RUN)  # as the trainer does (BRN's schedule)
    corrupt_running_statistics(model)
    return model


def corrupt_running_statistics(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            for name in getattr(m, "running_stat_names", ()):
                getattr(m, name).fill_(0.3 if name == "running_mean" else 7.0)


def test_whole_chunks_cover_the_test_set_once_and_fill_the_last_chunk_from_the_first():
    images = torch.arange(13.0).view(13, 1, 1, 1)
    groups = list(batches_of_whole_chunks(Batches(images, torch.arange(13), 5), 4))
    assert all(len(x) % 4 == 0 for x, _, _ in groups)
    assert torch.cat([y for _, y, _ in groups]).tolist() == list(range(13))
    assert [scored for _, _, scored in groups] == [4, 4, 4, 1]
    assert groups[-1][0].flatten().tolist() == [12.0, 0.0, 1.0, 2.0]


@pytest.mark.parametrize("norm", ["bn", "brn", "evonorm_b0"])
def test_evaluation_with_batch_statistics_equals_a_manual_train_mode_evaluation(norm):
    model = small_model(norm, batch=2).eval()
    state = copy.deepcopy(model.state_dict())
    images, labels = torch.randn(11, 3, 8, 8, dtype=F64), torch.randint(0, 4, (11,))
    ours = evaluate(model, Batches(images, labels, 5), statistics_batch=4)

    chunks = [(images[i:i + 4], labels[i:i + 4]) for i in (0, 4)]
    chunks.append((torch.cat([images[8:], images[:1]]), labels[8:]))
    loss, wrong = 0.0, 0
    for x, y in chunks:
        worker = copy.deepcopy(model).train()  # a fresh copy: nothing carries over
        for m in worker.modules():
            if isinstance(m, BatchStatistics):
                m.virtual_batch = None
        with torch.no_grad():
            logits = worker(x)[:len(y)]
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        wrong += (logits.argmax(1) != y).sum().item()
    assert ours["test_loss"] == pytest.approx(loss / 11)
    assert ours["test_error"] == pytest.approx(100 * wrong / 11)
    assert not model.training
    for key, value in model.state_dict().items():  # nothing written: stats, steps, counters
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    assert evaluate(model, Batches(images, labels, 5))["test_loss"] != pytest.approx(loss / 11)


def reference_precise_statistics(norm, model, images, chunk):
    """The population statistics Precise BN must find, computed directly: for each chunk of
    ``chunk`` images, run the stem conv and its norm in train mode from the paper's formulas,
    record the chunk's statistics of the norm's input, and average over chunks."""
    conv, layer = model.stem[0].conv, model.stem[0].norm
    stats = []
    for start in range(0, len(images), chunk):
        h = conv(images[start:start + chunk])
        mean, var = h.mean(dim=(0, 2, 3)), biased_var(h)
        values = h.numel() // h.shape[1]
        stats.append({"bn": {"running_mean": mean, "running_var": var * values / (values - 1)},
                      "brn": {"running_mean": mean, "running_std": torch.sqrt(var + EPS)},
                      "evonorm_b0": {"running_var": var}}[norm])
    return {k: torch.stack([s[k] for s in stats]).mean(0) for k in stats[0]}


@pytest.mark.parametrize("norm", ["bn", "brn", "evonorm_b0"])
def test_precise_bn_restores_the_population_statistics_of_the_data_it_is_given(norm):
    model = small_model(norm, batch=2)
    images = torch.randn(24, 3, 8, 8, dtype=F64)
    loader = Batches(images, torch.zeros(24, dtype=torch.long), 8)
    used = recompute_population_statistics(model, loader, samples=18, chunk=4)
    assert used == 20  # rounded up to whole chunks of 4
    expected = reference_precise_statistics(norm, model, images[:20], 4)
    for name, value in expected.items():
        torch.testing.assert_close(getattr(model.stem[0].norm, name), value.detach())
    # deeper layers too: no corrupted value is left anywhere
    for m in model.modules():
        if isinstance(m, BatchStatistics) and m.running_stat_names:
            assert not torch.any(getattr(m, m.running_stat_names[-1]) == 7.0)
            assert m.stats_mode == "update" and m.virtual_batch == 2 and m.collected is None


def test_precise_bn_makes_eval_mode_match_the_population_it_was_computed_on():
    # one BN layer, fed the whole data set as one worker: its precise statistics are the data's
    bn = build_norm("bn", 3).double()
    model = nn.Sequential(bn)
    corrupt_running_statistics(model)
    data = torch.randn(32, 3, 4, 4, dtype=F64) * 3 + 2
    recompute_population_statistics(model, [(data, None)], samples=32, chunk=32)
    torch.testing.assert_close(bn.running_mean, data.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(bn.running_var, data.var(dim=(0, 2, 3)))


def test_precise_statistics_put_the_moving_averages_and_the_rng_back():
    model = small_model("brn", batch=2)
    before = copy.deepcopy(model.state_dict())
    images = torch.randn(16, 3, 8, 8, dtype=F64)
    rng = torch.get_rng_state()
    with precise_statistics(model, Batches(images, torch.zeros(16), 8), samples=8, chunk=2) as n:
        assert n == 8
        assert not torch.equal(model.stem[0].norm.running_mean, before["stem.0.norm.running_mean"])
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), rng)


def fake_trainer(norm: str, bn_eval: str, epoch: int = 3, model: nn.Module | None = None):
    """What Trainer.evaluate reads, without data on disk."""
    class Fake:
        pass
    trainer = Fake()
    trainer.model = small_model(norm, batch=2) if model is None else model
    generator = torch.Generator().manual_seed(5)
    trainer.test_loader = Batches(torch.randn(12, 3, 8, 8, dtype=F64, generator=generator),
                                  torch.randint(0, 4, (12,), generator=generator), 5)
    trainer.train_loader = Batches(torch.randn(32, 3, 8, 8, dtype=F64, generator=generator),
                                   torch.zeros(32, dtype=torch.long), 8)
    trainer.train_loader.set_epoch(epoch)
    trainer.epoch = epoch
    # the RunConfig attributes evaluate reads
    trainer.cfg = SimpleNamespace(bn_eval=bn_eval, precise_bn_samples=16, batch=2, workers=4,
                                  norm=SimpleNamespace(name=norm))
    trainer._progress = lambda loader, desc: iter(loader)
    trainer._autocast = contextlib.nullcontext
    return trainer


@pytest.mark.parametrize("bn_eval", ["running", "precise", "batch"])
def test_trainer_records_the_train_mode_error_and_the_gap_for_batch_dependent_norms(bn_eval):
    trainer = fake_trainer("bn", bn_eval)
    before = copy.deepcopy(trainer.model.state_dict())
    record = Trainer.evaluate(trainer)
    train_mode = evaluate(trainer.model, trainer.test_loader, statistics_batch=2)
    assert record["train_mode_test_error"] == pytest.approx(train_mode["test_error"])
    assert record["bn_gap"] == pytest.approx(record["train_mode_test_error"] - record["test_error"])
    expected = {"running": lambda: evaluate(trainer.model, trainer.test_loader),
                "batch": lambda: train_mode}
    if bn_eval == "precise":
        model = copy.deepcopy(trainer.model)
        loader = Batches(trainer.train_loader.images, trainer.train_loader.labels, 8)
        loader.set_epoch(PRECISE_BN_EPOCH_OFFSET + 3)
        recompute_population_statistics(model, loader, samples=16, chunk=2)
        expected["precise"] = lambda: evaluate(model, trainer.test_loader)
    assert record["test_error"] == pytest.approx(expected[bn_eval]()["test_error"])
    assert record["test_loss"] == pytest.approx(expected[bn_eval]()["test_loss"])
    for key, value in trainer.model.state_dict().items():  # training is not disturbed
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert trainer.train_loader.epochs[-1] == 3


def test_precise_and_running_evaluations_differ_on_corrupted_statistics():
    records = {mode: Trainer.evaluate(fake_trainer("bn", mode)) for mode in ("running", "precise")}
    assert records["precise"]["test_loss"] != pytest.approx(records["running"]["test_loss"])


def test_batch_independent_models_record_no_gap():
    model = build_model("resnet8", num_classes=4, norm="gn", norm_options={"groups": 4},
                        stem="cifar", width=0.5).double()
    trainer = fake_trainer("gn", "precise", model=model)
    assert set(Trainer.evaluate(trainer)) == {"test_loss", "test_error"}
    assert trainer.train_loader.epochs == [3]  # no training batches were drawn


def test_statistics_batch_and_dedicated_epoch():
    assert statistics_batch("bn", 4, 8) == 4 and statistics_batch("syncbn", 4, 8) == 32
    loader = Batches(torch.zeros(4, 1, 1, 1), torch.zeros(4), 2)
    with dedicated_epoch(loader, 7):
        assert loader.epochs[-1] == PRECISE_BN_EPOCH_OFFSET + 7
    assert loader.epochs[-1] == 7


def test_batch_statistics_context_restores_modes_even_on_error():
    model = small_model("bn", batch=2).eval()
    with pytest.raises(RuntimeError):
        with batch_statistics(model, 4) as layers:
            assert model.training and all(m.stats_mode == "frozen" for m in layers)
            raise RuntimeError
    assert not model.training
    assert all(m.stats_mode == "update" and m.virtual_batch == 2
               for m in model.modules() if isinstance(m, BatchStatistics))
