"""The benchmark (scripts/bench.py and scripts/benchkit/): its measuring machinery, the GPU
item's code path on a small model on the CPU, and the whole benchmark in its --quick mode."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, compose_config
from normbench.config import parse_config
from normbench.norms import NORMS

sys.path.insert(0, str(ROOT / "scripts"))  # benchkit lives beside scripts/bench.py


def test_turns_rotate_and_ratios_are_taken_within_a_repetition():
    from benchkit.measure import Ratio, time_in_turns

    order = []
    times = time_in_turns({name: (lambda name=name: order.append(name)) for name in "abc"},
                          repeats=3, device=torch.device("cpu"), warmup=0)
    assert order == list("abcbcacab") and all(len(t) == 3 for t in times.values())
    ratio = Ratio.of({"a": [2.0, 9.0, 3.0], "b": [1.0, 3.0, 1.0]}, "a", "b")
    assert (ratio.median, ratio.low, ratio.high) == (3.0, 2.0, 3.0)


def test_a_target_is_met_on_its_side_of_the_threshold():
    from benchkit.measure import Ratio, check

    def ratio(median):
        return Ratio(median, median, median, 1)
    assert check(ratio(1.04), "<= 1.05") and check(ratio(1.05), "<= 1.05")
    assert not check(ratio(1.06), "<= 1.05")
    assert check(ratio(3.0), ">= 3") and check(ratio(3.2), ">= 3")
    assert not check(ratio(2.9), ">= 3")


@pytest.fixture
def one_thread():
    """One torch thread for a timing loop (seconds, not minutes, on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_gpu_item_runs_its_comparison_with_a_small_model_on_the_cpu(one_thread):
    # item 6 is skipped without a GPU; its code path (bn against gn, images/s, targets) runs here
    from benchkit.gpu_items import gpu_resnet50
    from benchkit.measure import Context

    ctx = Context(device=torch.device("cpu"),
                  base_config=parse_config(compose_config(["device=cpu", "model=resnet8"])),
                  repeats=3, model="resnet8", image_size=16)
    assert gpu_resnet50(ctx).skipped.startswith("not measured: no GPU")
    item = gpu_resnet50(ctx, model="resnet8", settings=((2, 2),), sizes=(16,),
                        modes=("eager",), min_images=8)
    # gn in channels_last and in NCHW, each against bn
    assert [row.what.split(": ")[1] for row in item.rows] == [
        "gn (channels_last) images/s / bn (channels_last) images/s",
        "gn (NCHW) images/s / bn (channels_last) images/s"]
    for row in item.rows:
        assert row.target == ">= 0.8" and row.passed == (row.ratio.median >= 0.8)
        assert row.details["bn_images_per_s"] > 0 and row.details["gn_images_per_s"] > 0


def test_bench_quick_mode_writes_its_report(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick",
                             "--threads", "1", "--out", str(tmp_path)], capture_output=True,
                            text=True, timeout=600, cwd=ROOT)  # minutes on a busy machine
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["quick"] and report["device"] == "cpu"
    assert report["hardware"]["torch_threads"] == 1 and report["versions"]["torch"]
    assert list(report["items"]) == ["framework_overhead", "virtual_workers",
                                     "virtual_workers_epoch", "norms", "data_loading",
                                     "gpu_resnet50", "fast_paths", "default_vs_today",
                                     "layouts", "bf16_results"]
    assert report["items"]["gpu_resnet50"]["skipped"]
    assert report["items"]["fast_paths"]["skipped"]  # torch.compile: only with --compile
    assert report["hardware"]["cpu_features"] and "cpu_bf16" in report["hardware"]
    # the default path against today's, for each model, norm and batch of the issue
    today = report["items"]["default_vs_today"]["rows"]
    assert len(today) == 4 and all("default (" in row["what"] for row in today)
    # bf16 against fp32: per-seed errors of both, on a CPU with bf16 units
    if report["hardware"]["cpu_bf16"]:
        assert report["items"]["bf16_results"]["rows"]
        for row in report["items"]["bf16_results"]["rows"]:
            assert len(row["details"]["fp32_errors"]) == len(row["details"]["bf16_errors"]) == 2
    else:  # nothing to compare: said so, no rows
        assert report["items"]["bf16_results"]["skipped"].startswith("not measured")
        assert not report["items"]["bf16_results"]["rows"]
    norms = {row["what"].split(": ")[1] for row in report["items"]["norms"]["rows"]}
    assert norms == {f"{name} / bn" for name in NORMS}
    for item in report["items"].values():
        for row in item["rows"]:
            if row["unit"] != "points":  # item 10: a difference of errors, of either sign
                assert row["ratio"]["median"] > 0
            if row["target"] is None:
                assert row["passed"] is None
            else:  # the verdict follows the median and the target
                median, words = row["ratio"]["median"], row["target"].split()
                if words[0] == "|diff|":  # item 10: "|diff| <= seed sd 2.83"
                    assert row["passed"] == (abs(median) <= float(words[-1]))
                else:
                    op, value = words
                    assert row["passed"] == (median <= float(value) if op == "<=" else
                                             median >= float(value))
    assert "were not measured" in (tmp_path / "bench.md").read_text()
    assert "were not measured" in result.stdout and "target <= 1.05" in result.stdout
