"""How the benchmark measures, and what every item shares: timing in turns, ratios, the
models and loops it times, where it ran, and the report.

How every figure is measured: the candidates of a comparison (e.g. normbench's loop and a
hand-written loop) run in turns, the order rotating from one repetition to the next; each turn
is timed (synchronizing the GPU before and after), the ratio between two candidates is taken
within each repetition, i.e. between turns that ran seconds apart, and the item reports the
median of those ratios with their range. A machine whose load changes during the run (other
jobs on a shared CPU) therefore moves both sides of a ratio alike; absolute times (ms, images/s)
are reported too but are only as good as the machine was quiet.

The items themselves are in :mod:`benchkit.cpu_items`, :mod:`benchkit.default_path` and
:mod:`benchkit.gpu_items` (listed in :mod:`benchkit`).
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from normbench.config import RunConfig, parse_config
from normbench.fast_paths import use_channels_last
from normbench.machine import cpu_features, cpu_has_bf16, cpu_model, gpu_model, package_versions
from normbench.models import MODELS, build_model
from normbench.norms import chunked_bn_variant, norm_options, set_total_steps, use_chunked_bn
from normbench.train import Trainer, autocast_dtype, parameter_groups

ROOT = Path(__file__).resolve().parents[2]
NO_GPU_LINE = ("GPU figures (item 6, and the GPU targets of items 3 and 5) were not measured: "
               "this run had no GPU. Run `python scripts/bench.py --device cuda` on one.")


# ---- measuring -----------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_in_turns(candidates: Mapping[str, Callable[[], Any]], repeats: int,
                  device: torch.device, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each candidate, ``repeats`` calls each, in rotating order.

    Each candidate is first called ``warmup`` times untimed (allocator, caches, compilation)."""
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            candidates[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = time.perf_counter()
            candidates[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


@dataclass(frozen=True)
class Ratio:
    """The median over repetitions of time(a) / time(b), and the range."""

    median: float
    low: float
    high: float
    repeats: int

    @classmethod
    def of(cls, times: Mapping[str, Sequence[float]], a: str, b: str) -> "Ratio":
        per_repeat = [x / y for x, y in zip(times[a], times[b])]
        return cls(statistics.median(per_repeat), min(per_repeat), max(per_repeat),
                   len(per_repeat))

    def inverse(self) -> "Ratio":
        return Ratio(1 / self.median, 1 / self.high, 1 / self.low, self.repeats)

    def as_dict(self) -> dict[str, float]:
        return {"median": self.median, "low": self.low, "high": self.high,
                "repeats": self.repeats}


@dataclass
class Row:
    """One line of the report: what was compared, the median ratio, the target."""

    what: str
    ratio: Ratio | None = None
    unit: str = "x"  # how to read `ratio`: "x" (a multiple)
    target: str | None = None  # e.g. "<= 1.05"
    passed: bool | None = None  # None: no target here
    details: dict[str, Any] = field(default_factory=dict)  # ms per step, images/s, ...

    def as_dict(self) -> dict[str, Any]:
        return {"what": self.what, "ratio": self.ratio.as_dict() if self.ratio else None,
                "unit": self.unit, "target": self.target, "passed": self.passed,
                "details": self.details}


def check(ratio: Ratio, target: str) -> bool:
    """Whether the median meets ``target`` ("<= 1.05" or ">= 3")."""
    op, value = target.split()
    return ratio.median <= float(value) if op == "<=" else ratio.median >= float(value)


@dataclass
class Item:
    key: str
    number: int
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None  # why the item was not measured
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"number": self.number, "title": self.title, "skipped": self.skipped,
                "rows": [r.as_dict() for r in self.rows], "notes": self.notes,
                "seconds": round(self.seconds, 1)}


# ---- what is measured ----------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """How a training step runs, as the config and the library choose it: what the benchmark
    compares side by side."""

    name: str
    precision: str = "auto"  # the config's precision: auto, fp32, bf16
    channels_last: str | bool = "auto"  # the config's channels_last
    chunked_bn: str | None = None  # normbench.norms.CHUNKED_BN_VARIANTS; None: device default
    fused_sgd: bool = True  # normbench.train.sgd: the fused kernel, or the per-parameter loop

    def amp_dtype(self, device: torch.device) -> torch.dtype | None:
        return autocast_dtype(self.precision, device)

    def channels_last_on(self, norm: str, device: torch.device) -> bool:
        return use_channels_last(self.channels_last, norm, device, self.amp_dtype(device))

    def describe(self, norm: str, device: torch.device) -> str:
        """What the variant resolves to for ``norm`` here, e.g. 'bf16, channels_last, bn
        per_worker'."""
        precision = "bf16" if self.amp_dtype(device) == torch.bfloat16 else "fp32"
        layout = "channels_last" if self.channels_last_on(norm, device) else "NCHW"
        like = torch.empty(2, 2, 2, 2, device=device,  # an input in the model's layout
                           memory_format=torch.channels_last if layout != "NCHW"
                           else torch.contiguous_format)
        with use_chunked_bn(self.chunked_bn):
            bn = chunked_bn_variant(like)
        return f"{precision}, {layout}" + (f", per-worker bn {bn}" if norm == "bn" else "")

    def run(self, fn: Callable[[], Any]) -> Callable[[], None]:
        """``fn`` with this variant's per-worker BN implementation in force."""
        def with_chunked_bn() -> None:
            with use_chunked_bn(self.chunked_bn):
                fn()
        return with_chunked_bn


# The path before issue #13 (fp32, NCHW, the hand-written per-worker BN, SGD's per-parameter
# loop) and the default now.
TODAY = Variant("today", precision="fp32", channels_last=False, chunked_bn="hand_written",
                fused_sgd=False)
DEFAULT = Variant("default")


@dataclass
class Context:
    """What every item needs: the device, the run size and the base config (conf/ composed)."""

    device: torch.device
    base_config: RunConfig  # the default run config as run.py composes it
    quick: bool = False
    repeats: int = 7
    workers: int = 8
    model: str = "resnet20"  # conf/model/ choice of the CPU items (base_config.model)
    image_size: int = 32
    compile: bool = False  # also measure torch.compile in item 7 (always on CUDA)
    num_workers: int = 2  # DataLoader processes for the image-folder pipeline
    gpu_sizes: Sequence[int] = (32, 224)  # item 6: input sizes
    gpu_modes: Sequence[str] = ("eager", "compiled")  # item 6
    variant: Variant = DEFAULT  # how the items other than 8 to 10 run their steps

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return self.variant.amp_dtype(self.device)

    def config(self, **changes: Any) -> dict[str, Any]:
        """The base config as a plain mapping, with top-level keys and ``dataset`` / ``norm``
        entries changed (:func:`normbench.config.parse_config` makes a run config of it)."""
        cfg = copy.deepcopy(self.base_config.to_dict())
        for key, value in changes.items():
            if key in ("dataset", "norm", "model", "optim") and isinstance(value, Mapping):
                cfg[key].update(value)
            else:
                cfg[key] = value
        return cfg


def norm_options_for(norm: str, model: str, width: float = 1.0) -> dict[str, Any]:
    """The norm's options for a model: GN-like norms get 8 groups where the paper's 32 do not
    divide the narrowest stage (ResNet-20 at width 1: 16 channels; as conf/norm/gn8.yaml)."""
    if norm in ("gn", "evonorm_s0") and round(min(MODELS[model].widths) * width) % 32:
        return {"groups": 8}
    return {}


def stem_for(image_size: int) -> str:
    return "cifar" if image_size <= 64 else "imagenet"


def bench_model(ctx: Context, norm: str, batch: int | None, *, model: str | None = None,
                image_size: int | None = None, num_classes: int = 10,
                channels_last: str | bool | None = None, compile_mode: str | None = None,
                variant: Variant | None = None) -> nn.Module:
    """A model on the device, seeded, with the fast paths a run with these settings uses
    (``variant``'s, default the context's; ``channels_last`` overrides the variant's layout).
    ``model=None``: the base config's model (name, width, zero_init_last); else the registry's
    ``model`` at width 1 (as conf/model/<model>.yaml)."""
    variant = variant or ctx.variant
    base = ctx.base_config.model
    name, width, zero_init_last = ((base.name, base.width, base.zero_init_last) if model is None
                                   else (model, 1.0, True))
    torch.manual_seed(0)
    net = build_model(name, num_classes=num_classes, norm=norm,
                      norm_options=norm_options_for(norm, name, width),
                      batch=batch, stem=stem_for(image_size or ctx.image_size),
                      width=width, zero_init_last=zero_init_last).to(ctx.device)
    layout = variant.channels_last if channels_last is None else channels_last
    if use_channels_last(layout, norm, ctx.device, variant.amp_dtype(ctx.device)):
        net.to(memory_format=torch.channels_last)
    if compile_mode is not None:
        net.compile(mode=compile_mode)
    return net


def random_batches(ctx: Context, steps: int, images: int, image_size: int | None = None,
                   num_classes: int = 10, seed: int = 0
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed normalized-looking image batches and labels on the device."""
    generator = torch.Generator().manual_seed(seed)
    size = image_size or ctx.image_size
    return [(torch.randn(images, 3, size, size, generator=generator).to(ctx.device),
             torch.randint(0, num_classes, (images,), generator=generator).to(ctx.device))
            for _ in range(steps)]


class MinimalLoop:
    """The hand-written training loop: what a PyTorch user writes without a framework. Inputs
    in the model's memory format, autocast and per-worker BN as ``variant`` (default: the
    context's) says."""

    def __init__(self, ctx: Context, model: nn.Module,
                 batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 mark_cudagraph_steps: bool = False, variant: Variant | None = None) -> None:
        self.variant = variant or ctx.variant
        amp_dtype = self.variant.amp_dtype(ctx.device)
        self.autocast = (lambda: torch.autocast(ctx.device.type, dtype=amp_dtype)) \
            if amp_dtype is not None else contextlib.nullcontext
        conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        memory_format = (torch.channels_last if conv.weight.is_contiguous(
            memory_format=torch.channels_last) and not conv.weight.is_contiguous()
            else torch.contiguous_format)
        batches = [(images.contiguous(memory_format=memory_format), labels)
                   for images, labels in batches]
        optim = ctx.base_config.optim
        global_batch = len(batches[0][1])
        self.ctx, self.model, self.batches = ctx, model, batches
        set_total_steps(model, len(batches))  # BRN's schedule: one call is one run
        self.optimizer = torch.optim.SGD(
            parameter_groups(model, optim.weight_decay, optim.norm_weight_decay),
            lr=optim.lr_per_256 * global_batch / 256, momentum=optim.momentum,
            nesterov=optim.nesterov)
        self.mark_cudagraph_steps = mark_cudagraph_steps
        model.train()

    def __call__(self) -> None:
        with use_chunked_bn(self.variant.chunked_bn):
            for images, labels in self.batches:
                if self.mark_cudagraph_steps:
                    torch.compiler.cudagraph_mark_step_begin()
                with self.autocast():
                    loss = F.cross_entropy(self.model(images), labels)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()


class FixedBatches:
    """A training loader that yields the same pre-made batches every epoch."""

    def __init__(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = list(batches)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def trainer_for(ctx: Context, *, batch: int, workers: int, norm: str = "bn",
                train_size: int, model: str | None = None, image_size: int | None = None,
                variant: Variant | None = None, **changes: Any) -> Trainer:
    """normbench's Trainer on a synthetic data set of ``train_size`` images (no run folder:
    only :meth:`Trainer.train_epoch` and :meth:`Trainer.evaluate` are used); the model as in
    :func:`bench_model`, precision and layout as ``variant`` says (default: the context's; its
    per-worker BN is set by whoever calls the trainer: :meth:`Variant.run`). ``changes``:
    further config keys; ``dataset`` and ``optim`` entries are merged into the above."""
    variant = variant or ctx.variant
    base = ctx.base_config.to_dict()
    node = base["model"] if model is None else {**base["model"], "name": model, "width": 1.0}
    dataset = {"name": "synthetic", "train_size": train_size,
               "test_size": max(batch * workers, 64), "image_size": image_size or ctx.image_size,
               **changes.pop("dataset", {})}
    cfg = ctx.config(batch=batch, workers=workers, model={**node, "stem": "cifar"},
                     precision=variant.precision, channels_last=variant.channels_last,
                     dataset=dataset, progress=False, device=str(ctx.device),
                     optim={**base["optim"], **changes.pop("optim", {})}, **changes)
    # the norm's node as conf/norm/<norm>.yaml has it (its options with the library's defaults,
    # which those files repeat), not the base config's bn node with another name
    cfg["norm"] = {"name": norm, **norm_options(norm),
                   **norm_options_for(norm, node["name"], node["width"])}
    torch.manual_seed(0)
    return Trainer(parse_config(cfg), folder=None, fused_sgd=variant.fused_sgd)


def repeat(fn: Callable[[], Any], times: int) -> Callable[[], None]:
    """``fn`` called ``times`` times in a row: one timed turn of several steps."""
    def repeated() -> None:
        for _ in range(times):
            fn()
    return repeated


def step_times(times: Mapping[str, Sequence[float]], name: str, steps: int) -> float:
    """Median milliseconds per step of candidate ``name`` (``steps`` steps per turn)."""
    return 1000 * statistics.median(times[name]) / steps


# ---- where it ran ------------------------------------------------------------------------------
def hardware(device: torch.device) -> dict[str, Any]:
    """The machine (from :mod:`normbench.machine`, the one place for provenance), the torch
    threads and, on CUDA, the GPU."""
    info: dict[str, Any] = {
        "cpu": cpu_model(), "cpu_features": cpu_features(), "cpu_bf16": cpu_has_bf16(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _memory_gib(), "platform": platform.platform(),
        "gpu": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": gpu_model(device),
                       "memory_gib": round(props.total_memory / 2**30, 1),
                       "count": torch.cuda.device_count()}
    return info


def _memory_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    return None


def load_average() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def versions() -> dict[str, Any]:
    info: dict[str, Any] = {
        **package_versions(), "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                                 text=True, check=True).stdout.strip()
        info["git_commit"] = commit
        info["git_uncommitted_changes"] = bool(changed)
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    return info


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as a Markdown page (what bench.md holds)."""
    hw, ver = report["hardware"], report["versions"]
    gpu = hw["gpu"]["name"] if hw.get("gpu") else "none"
    lines = [
        "# normbench performance benchmark", "",
        f"Command: `{report['command']}`  ",
        f"Date: {report['date']}; device: {report['device']}; "
        f"{'quick (smoke) mode; ' if report['quick'] else ''}{report['seconds']:.0f} s  ",
        f"Hardware: {hw['cpu']}, {hw['cpu_cores']} cores ({hw['torch_threads']} torch threads), "
        f"{hw['memory_gib']} GiB; GPU: {gpu}  ",
        f"CPU features: {hw['cpu_features']}; native bf16 (AVX512-BF16 or AMX): "
        f"{'yes' if hw['cpu_bf16'] else 'no, precision=auto is fp32 here'}  ",
        f"Items 1-7 ran the {report['variant']['name']} path: bn {report['variant']['bn']}; gn "
        f"{report['variant']['gn']}  ",
        f"Versions: Python {ver['python']}, torch {ver['torch']}, torchvision "
        f"{ver['torchvision']}, CUDA {ver['cuda']}, cuDNN {ver['cudnn']}; normbench "
        f"{(ver.get('git_commit') or '?')[:12]}"
        f"{' + uncommitted changes' if ver.get('git_uncommitted_changes') else ''}  ",
        f"Load average (1, 5, 15 min) before: {report['load_before']}, after: "
        f"{report['load_after']}", "",
        *([f"**{NO_GPU_LINE}**", ""] if report["device"] != "cuda" else []),
        "Each ratio is the median over repetitions of a ratio measured side by side "
        "(candidates timed in turns, rotating order); [low - high] is its range. "
        "Absolute times depend on how busy the machine was.", "",
        "| # | comparison | ratio (median) | range | target | result |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for item in report["items"].values():
        if item["skipped"]:
            lines.append(f"| {item['number']} | {item['title']} | | | | {item['skipped']} |")
            continue
        for row in item["rows"]:
            r = row["ratio"]
            value = _value(row)
            spread = f"{r['low']:.3g} - {r['high']:.3g}" if r and r["repeats"] > 1 else ""
            result = {True: "pass", False: "**FAIL**", None: ""}[row["passed"]]
            lines.append(f"| {item['number']} | {row['what']} | {value} | {spread} | "
                         f"{row['target'] or ''} | {result} |")
    lines += ["", "## Details", ""]
    for item in report["items"].values():
        lines.append(f"### {item['number']}. {item['title']}")
        lines.append("")
        if item["skipped"]:
            lines += [item["skipped"], ""]
            continue
        for row in item["rows"]:
            if row["details"]:
                shown = ", ".join(f"{k} {_fmt(v)}" for k, v in row["details"].items())
                lines.append(f"- {row['what']}: {shown}")
        lines += [f"- {note}" for note in item["notes"]]
        lines += [f"- measured in {item['seconds']:.0f} s", ""]
    return "\n".join(lines) + "\n"


def _value(row: Mapping[str, Any]) -> str:
    r = row["ratio"]
    if not r:
        return ""
    return f"{r['median']:.3g}" if row.get("unit", "x") == "x" else f"{_fmt(r['median'])} " \
        f"{row['unit']}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def render_table(report: Mapping[str, Any]) -> str:
    """A plain-text table for the terminal."""
    rows = [("#", "comparison", "ratio", "range", "target", "result")]
    for item in report["items"].values():
        if item["skipped"]:
            rows.append((str(item["number"]), item["title"], "", "", "", item["skipped"]))
            continue
        for row in item["rows"]:
            r = row["ratio"]
            rows.append((str(item["number"]), row["what"], _value(row),
                         f"{r['low']:.3g}-{r['high']:.3g}" if r and r["repeats"] > 1 else "",
                         row["target"] or "",
                         {True: "pass", False: "FAIL", None: ""}[row["passed"]]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1]
                     for r in rows)


__all__ = ["Context", "ITEMS", "Item", "MinimalLoop", "NO_GPU_LINE", "Ratio", "Row", "hardware",
           "load_average", "render_markdown", "render_table", "time_in_turns", "versions"]
