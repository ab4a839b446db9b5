"""The training step: no host-device synchronization per step, the precision and layout a run
actually used recorded, divergence found at its step without a read per step."""

from __future__ import annotations

import pytest
import torch

from normbench import machine
from normbench.train import Diverged, Trainer, autocast_dtype

from conftest import compose_config

STEPS = ["model=resnet8", "dataset=synthetic", "dataset.train_size=64", "dataset.test_size=40",
         "dataset.image_size=8", "batch=4", "workers=2", "epochs=1", "wandb.mode=disabled",
         "progress=false", "device=cpu"]

# Every way a tensor's value reaches Python (each one waits for the device on a GPU).
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")


def count_host_reads(monkeypatch) -> list[str]:
    calls: list[str] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.mark.parametrize("norm", [["norm=bn"], ["norm=gn", "norm.groups=4"]])
def test_an_epoch_reads_the_device_a_fixed_number_of_times_whatever_its_steps(monkeypatch, norm):
    reads = {}
    for size in (64, 256):  # 8 and 32 steps
        trainer = Trainer(compose_config(STEPS + norm + [f"dataset.train_size={size}"]),
                          folder=None)
        calls = count_host_reads(monkeypatch)
        trainer.train_epoch()
        monkeypatch.undo()
        reads[size] = len(calls)
    assert reads[64] == reads[256] <= 3, reads


def test_a_non_finite_loss_is_reported_at_the_step_it_appeared():
    trainer = Trainer(compose_config(STEPS + ["optim.lr_per_256=1e30"]), folder=None)
    with pytest.raises(Diverged, match=r"epoch 1, step \d+") as raised:
        trainer.train_epoch()
    # the loss is computed before the step's update, so the first steps are finite
    assert 1 < raised.value.step <= trainer.step


def test_precision_auto_is_bf16_exactly_where_the_hardware_has_it(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr("normbench.train.cuda_has_bf16", lambda: True)  # A100, H100, ...
    assert autocast_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr("normbench.train.cuda_has_bf16", lambda: False)  # V100, T4: emulated
    assert autocast_dtype("auto", cuda) is None
    assert autocast_dtype("bf16", cuda) == torch.bfloat16  # asked for: given
    assert autocast_dtype("fp32", cuda) is None and autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) == torch.bfloat16
    monkeypatch.setattr("normbench.train.cpu_has_bf16", lambda: True)
    assert autocast_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr("normbench.train.cpu_has_bf16", lambda: False)
    assert autocast_dtype("auto", cpu) is None


def test_bf16_detection_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert not machine.cpu_has_bf16()
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"}))
    assert machine.cpu_has_bf16()


def test_a_cpu_run_on_a_machine_with_a_gpu_records_no_gpu(monkeypatch):
    # On a CUDA machine torch.cuda.get_device_name refuses a CPU device: a run with device=cpu
    # there (the CPU tests, say) must record gpu None, not crash while writing its summary.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    assert machine.gpu_model(torch.device("cpu")) is None
    assert machine.describe_machine("cpu")["gpu"] is None
    assert machine.gpu_model("cuda") == machine.gpu_model() == "Some GPU"


@pytest.mark.parametrize("has_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_the_summary_records_what_auto_chose(monkeypatch, has_bf16, expected):
    # both branches on every machine: the CPU's answer is replaced (bf16 autocast also runs,
    # slowly, on a CPU without bf16 units)
    monkeypatch.setattr("normbench.train.cpu_has_bf16", lambda: has_bf16)
    trainer = Trainer(compose_config(STEPS + ["precision=auto"]), folder=None)
    assert trainer.amp_dtype == (torch.bfloat16 if has_bf16 else None)
    trainer.train_epoch()
    summary = trainer.summary("failed")  # (no epoch recorded: not a finished run)
    assert summary["precision"] == expected
    assert summary["channels_last"] == (trainer.memory_format == torch.channels_last)
    assert summary["machine"]["cpu"] == machine.cpu_model()


def test_inputs_reach_the_model_in_its_memory_format(monkeypatch):
    trainer = Trainer(compose_config(STEPS + ["channels_last=true", "precision=fp32"]),
                      folder=None)
    seen = []
    trainer.model.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    trainer.train_epoch()
    assert seen and all(seen)


def test_fused_sgd_trains_the_same_weights_as_the_per_parameter_loop():
    """The default fused SGD kernel against the loop it replaced (the benchmark's `today`):
    an epoch of 8 steps with momentum, Nesterov, weight decay and a warm-up in fp32."""
    cfg = compose_config(STEPS + ["precision=fp32", "optim.warmup_epochs=0.5"])
    weights = {}
    for fused in (True, False):
        torch.manual_seed(0)
        trainer = Trainer(cfg, folder=None, fused_sgd=fused)
        assert trainer.optimizer.defaults["fused"] is (True if fused else None)
        initial = [p.detach().clone() for p in trainer.model.parameters()]
        trainer.train_epoch()
        weights[fused] = [p.detach().clone() for p in trainer.model.parameters()]
        assert all((w != w0).any() for w, w0 in zip(weights[fused], initial))  # all trained
    for fused_weight, loop_weight in zip(weights[True], weights[False]):
        torch.testing.assert_close(fused_weight, loop_weight, rtol=0, atol=1e-6)
