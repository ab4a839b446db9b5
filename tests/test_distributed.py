"""Several processes: DDP on gloo, as torchrun or SLURM (through submitit) start it.

syncbn across two processes against BN over the concatenated batch (values and gradients) is
tested in test_norm_zoo.py; here the whole training step, the launch and the records.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import ROOT, compose_config, kill_after_first_epoch, run_cli, run_two_processes
from normbench import distributed
from normbench.config import ConfigError, parse_config, run_name
from normbench.train import Trainer

# 64 training images, 2 workers of 4: one epoch is 8 steps. lr 0.05 moves the parameters well
# away from their initial values; at 0.2, GN on this tiny set turns chaotic and the summation
# order alone makes the two runs differ by 1%.
SMALL = ["model=resnet8", "dataset=synthetic", "dataset.train_size=64", "dataset.test_size=40",
         "dataset.image_size=16", "batch=4", "workers=2", "epochs=1", "optim.lr_per_256=1.6",
         "optim.milestones=[0.9]", "wandb.mode=disabled", "progress=false",
         # fp32: one process vs two is compared at fp32 tolerance (bf16 autocast, which
         # precision=auto picks on CPUs with bf16 units, rounds each process's convs apart)
         "precision=fp32"]
NORMS = {"bn": ["norm=bn"], "syncbn": ["norm=syncbn"], "gn": ["norm=gn", "norm.groups=4"]}

# The end-to-end runs: 16 steps per epoch, long enough to be stopped in the middle.
E2E = ["model=resnet8", "dataset=synthetic", "dataset.train_size=512", "dataset.test_size=100",
       "dataset.image_size=16", "batch=8", "workers=4", "epochs=4", "wandb.mode=disabled",
       "progress=false", "precision=fp32"]  # compared with one process at fp32 tolerance


# ---- one training epoch: 2 processes x 1 virtual worker = 1 process x 2 virtual workers ------
def trained_state(cfg: dict) -> dict:
    """Model state and metrics after one training epoch and an evaluation."""
    trainer = Trainer(cfg, folder=None)
    train = trainer.train_epoch()
    test = trainer.evaluate_all_processes()
    state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return {"state": state, "train_loss": train["train_loss"],
            "train_error": train["train_error"], **test}


def _two_process_worker(rank: int, world: int, init_file: str, out_dir: str,
                        configs: dict) -> None:
    torch.set_num_threads(1)  # two processes on two cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        results = {name: trained_state(cfg) for name, cfg in configs.items()}
        torch.save(results, Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()




@pytest.fixture
def one_thread():
    """One torch thread in this process for the test: with the two worker processes on two
    (often busy) cores, more threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_two_processes_train_like_one_process_with_two_virtual_workers(tmp_path, one_thread):
    configs = {name: compose_config(SMALL + overrides) for name, overrides in NORMS.items()}
    run_two_processes(_two_process_worker, str(tmp_path / "init"), str(tmp_path), configs)
    ranks = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    for name, cfg in configs.items():
        one = trained_state(cfg)  # this process: one process, workers=2 virtual workers
        first, second = ranks[0][name], ranks[1][name]
        for key, value in one["state"].items():
            # every process holds the same model, running statistics included (averaged)
            torch.testing.assert_close(first["state"][key], second["state"][key], rtol=0, atol=0,
                                       msg=f"{name}: {key} differs between the processes")
            # float32 tolerance: the gradients are summed in another order
            torch.testing.assert_close(first["state"][key], value, rtol=1e-4, atol=1e-5,
                                       msg=f"{name}: {key} differs from one process")
        initial = Trainer(cfg, None).model.fc.weight.detach()
        assert (one["state"]["fc.weight"] - initial).abs().max() > 1e-3  # the step did something
        for key in ("train_loss", "train_error", "test_loss", "test_error"):
            assert first[key] == second[key]
            assert first[key] == pytest.approx(one[key], rel=1e-5), (name, key)


# ---- torchrun end to end ----------------------------------------------------------------------
# ---- syncbn across processes: exact to float32 rounding, gradients included --------------------
# Unequal shares (3 and 5 images), so the merge must weight each process by its count; each
# channel has |mean| / std = 300, where E[x^2] - E[x]^2 in float32 loses the variance.
SYNC_IMAGES, SYNC_SHAPE = (3, 5), (4, 6, 6)


def _far_from_zero_data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(sum(SYNC_IMAGES), *SYNC_SHAPE, generator=generator, dtype=torch.float64)
    std = torch.tensor([1.0, 0.01, 30.0, 2.0], dtype=torch.float64).view(1, -1, 1, 1)
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64).view(1, -1, 1, 1)
    return x * std + sign * 300 * std, torch.randn(x.shape, generator=generator,
                                                   dtype=torch.float64)


def _syncbn_far_from_zero_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from normbench.norms import build_norm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        x_all, weights = _far_from_zero_data()
        start = sum(SYNC_IMAGES[:rank])
        mine = slice(start, start + SYNC_IMAGES[rank])
        results = {}
        for dtype in (torch.float32, torch.float64):
            layer = build_norm("syncbn", SYNC_SHAPE[0]).to(dtype)
            with torch.no_grad():  # gamma and beta away from 1 and 0, so their gradients matter
                layer.weight.copy_(torch.tensor([1.5, 0.7, 1.2, 0.9]))
                layer.bias.copy_(torch.tensor([0.1, -0.3, 0.2, 0.0]))
            x = x_all[mine].to(dtype).requires_grad_(True)
            y = layer(x)
            (y * weights[mine].to(dtype)).sum().backward()
            for p in layer.parameters():  # the total gradient, as DDP would sum it
                dist.all_reduce(p.grad)
            results[str(dtype)] = {"y": y.detach(), "x_grad": x.grad,
                                   "weight_grad": layer.weight.grad, "bias_grad": layer.bias.grad,
                                   "running_mean": layer.running_mean,
                                   "running_var": layer.running_var}
        torch.save(results, Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_syncbn_across_two_processes_is_exact_far_from_zero_with_unequal_shares(tmp_path,
                                                                                one_thread):
    run_two_processes(_syncbn_far_from_zero_worker, str(tmp_path / "init"), str(tmp_path))
    ranks = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    x, weights = _far_from_zero_data()

    # the float64 reference: BN over the concatenated batch, from the formulas
    gamma = torch.tensor([1.5, 0.7, 1.2, 0.9], dtype=torch.float64, requires_grad=True)
    beta = torch.tensor([0.1, -0.3, 0.2, 0.0], dtype=torch.float64, requires_grad=True)
    xr = x.clone().requires_grad_(True)
    mean = xr.mean(dim=(0, 2, 3), keepdim=True)
    var = ((xr - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    ref = (xr - mean) / torch.sqrt(var + 1e-5) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)
    ref_grads = torch.autograd.grad((ref * weights).sum(), [xr, gamma, beta])
    values = x.numel() // x.shape[1]
    ref_running_var = 0.9 + 0.1 * var.flatten() * values / (values - 1)
    ref_running_mean = 0.1 * mean.flatten()

    # float64: equal to the reference, values and gradients, on both processes
    for rank, result in enumerate(ranks):
        r = result[str(torch.float64)]
        start = sum(SYNC_IMAGES[:rank])
        mine = slice(start, start + SYNC_IMAGES[rank])
        torch.testing.assert_close(r["y"], ref[mine].detach())
        torch.testing.assert_close(r["x_grad"], ref_grads[0][mine])
        torch.testing.assert_close(r["weight_grad"], ref_grads[1])
        torch.testing.assert_close(r["bias_grad"], ref_grads[2])
        torch.testing.assert_close(r["running_mean"], ref_running_mean)
        torch.testing.assert_close(r["running_var"], ref_running_var)

    # float32: as accurate as torch's own BN on the whole batch in one process
    ours = torch.cat([r[str(torch.float32)]["y"] for r in ranks]).double()
    torch_bn = torch.nn.functional.batch_norm(
        x.float(), None, None, gamma.detach().float(), beta.detach().float(), training=True,
        eps=1e-5).double()
    our_error = (ours - ref).abs().max().item()
    torch_error = (torch_bn - ref).abs().max().item()
    assert our_error <= 2 * torch_error + 1e-6, (our_error, torch_error)
    for r in ranks:
        r = r[str(torch.float32)]
        torch.testing.assert_close(r["running_var"].double(), ref_running_var, rtol=1e-5, atol=0)
        torch.testing.assert_close(r["running_mean"].double(), ref_running_mean, rtol=1e-5,
                                   atol=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(args: list[str], processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
            f"--master-port={free_port()}", str(ROOT / "run.py"), *args]


def torchrun(args: list[str], cwd: Path, *, check: bool = True,
             timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(torchrun_command(args), cwd=cwd, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check and result.returncode != 0:
        raise AssertionError(f"torchrun run.py {' '.join(args)} exited {result.returncode}\n"
                             f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
    return result


def kill_with_children(pid: int) -> None:
    """SIGKILL a process and all its descendants. torchrun starts every worker in a session of
    its own, so killing torchrun's process group would leave the workers running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process has ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    family, todo = [], [pid]
    while todo:
        family.append(todo.pop())
        todo.extend(children.get(family[-1], []))
    for member in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)


def read_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_run_is_stopped_resumes_and_ends_like_one_process(tmp_path):
    out = tmp_path / "two"
    folder = out / "default" / run_name(compose_config(E2E))
    process = subprocess.Popen(torchrun_command(E2E + [f"out_root={out}"]), cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # torchrun and both processes, no clean-up
    done_before_kill = kill_after_first_epoch(process, folder,
                                              lambda: kill_with_children(process.pid))
    assert 1 <= done_before_kill < 4 and not (folder / "summary.json").exists()

    result = torchrun(E2E + [f"out_root={out}"], cwd=tmp_path)
    assert f"resuming after epoch {done_before_kill}" in result.stderr
    # one run folder, written by the first process only: no .hydra/ or log of the other
    assert [p.name for p in (out / "default").iterdir()] == [folder.name]
    assert {p.name for p in folder.iterdir()} >= {
        "config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt", "launches.jsonl",
        ".hydra", "run.log"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two"]  # nothing in the cwd
    log = (folder / "run.log").read_text()
    assert log.count("epoch 4/4") == 1 and log.count("resuming after epoch") == 1
    launches = [json.loads(line)["outcome"]
                for line in (folder / "launches.jsonl").read_text().splitlines()]
    assert launches == ["resumed"]  # the killed launch could not record itself
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["processes"] == 2

    # The same run in one process (4 virtual workers). Not bit-equal: DDP sums the gradients
    # of the two processes instead of one backward pass over all images, so parameters differ
    # in the last float32 bits and losses by about 1e-7 (relative); an error may flip one image
    # whose two top logits are that close.
    run_cli(E2E + [f"out_root={tmp_path / 'one'}"], cwd=tmp_path,
            env={"OMP_NUM_THREADS": "1"})
    one = read_metrics(tmp_path / "one" / "default" / folder.name)
    two = read_metrics(folder)
    assert [m["step"] for m in two] == [m["step"] for m in one] == [16, 32, 48, 64]
    one_image = {"train_error": 100 / 512, "test_error": 100 / 100}
    for a, b in zip(one, two):
        for key in ("train_loss", "test_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
        for key, tolerance in one_image.items():
            assert abs(b[key] - a[key]) <= tolerance + 1e-9, key


def test_torchrun_refuses_workers_the_processes_do_not_divide(tmp_path):
    # hydra.run.dir differs between the processes: the first one's folder is used, the other
    # process's empty folder is removed.
    result = torchrun(E2E + ["workers=3", f"hydra.run.dir={tmp_path}/run_${{oc.env:RANK}}"],
                      cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert ("workers=3 is not divisible by the 2 processes of this launch (each process runs "
            "workers / 2 virtual workers); choose a multiple of 2") in result.stderr
    assert "normbench/train.py" not in result.stderr  # no traceback of ours (torchrun has one)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_0"]
    summary = json.loads((tmp_path / "run_0" / "summary.json").read_text())
    assert summary["status"] == "failed" and "workers=3" in summary["error"]


# ---- the launch environment and the checks, in this process ------------------------------------
def test_single_process_without_launch_variables(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.launch_from_environment() is None
    # SLURM variables alone (an allocation, a batch script) are one process, not a launch
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert distributed.launch_from_environment() is None
    assert distributed.launch_from_environment({"RANK": "0", "WORLD_SIZE": "1"}) is None
    assert distributed.world_size() == 1 and distributed.is_first_process()


def test_torchrun_variables_give_the_launch():
    launch = distributed.launch_from_environment(
        {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7",
         "MASTER_PORT": "29400"})
    assert launch == distributed.Launch(rank=5, world_size=8, local_rank=1, master_addr="node7",
                                        master_port=29400, launcher="torchrun")


def test_submitit_slurm_tasks_give_the_launch(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_ARRAY_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "5",
             "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
             "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    launch = distributed.launch_from_environment()
    assert launch == distributed.Launch(rank=5, world_size=8, local_rank=1, master_addr="gpu07",
                                        master_port=distributed.job_port("4242"),
                                        launcher="submitit")
    assert 20000 <= launch.master_port < 30000


@pytest.mark.parametrize("overrides, message", [
    ({"workers": 6}, "workers=6 is not divisible by the 4 processes of this launch (each process "
                    "runs workers / 4 virtual workers); choose a multiple of 4: 4, 8, 12, ..."),
    ({"workers": 8, "device": "cuda:1"}, "device='cuda:1' is not allowed with 4 processes: each "
                                     "process uses its own GPU (cuda:LOCAL_RANK); choose one "
                                     "of: auto, cuda, cpu"),
    ({"workers": 8, "bn_eval": "precise"}, "bn_eval=precise is not supported with 4 processes yet; "
                                       "choose one of: running, batch"),
])
def test_configs_the_processes_cannot_run_are_refused(overrides, message):
    # replaced after parsing: cuda:1 would be refused before, on a machine without CUDA
    cfg = replace(parse_config(compose_config(SMALL)), **overrides)
    with pytest.raises(ConfigError) as error:
        distributed.check_process_count(cfg, 4)
    assert message in str(error.value)
    distributed.check_process_count(cfg, 1)  # one process runs anything


@pytest.mark.slow  # about 20 s on two busy cores, which would take this file past 90 s
def test_submitit_job_with_two_tasks_trains_one_run_with_two_processes(tmp_path):
    # The SLURM path on one machine: submitit's local executor starts the tasks of a job as
    # SLURM does, and each joins the process group from submitit's job environment.
    overrides = SMALL + ["norm=gn", "norm.groups=4", "epochs=2"]
    result = run_cli(["-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
                      *overrides, f"out_root={tmp_path}"], cwd=tmp_path,
                     env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})  # normbench importable
    assert "trained 1" in result.stdout
    folders = [p for p in (tmp_path / "default").iterdir()
               if p.is_dir() and not p.name.startswith(".")]  # not .submitit/
    assert [p.name for p in folders] == [run_name(compose_config(overrides))]
    summary = json.loads((folders[0] / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["processes"] == 2
    assert len(read_metrics(folders[0])) == 2
    task_logs = sorted((tmp_path / "default" / ".submitit").glob("*/*_log.err"))
    assert len(task_logs) == 2  # the second task logged no progress
    assert "epoch 2/2" in task_logs[0].read_text() and "epoch" not in task_logs[1].read_text()
