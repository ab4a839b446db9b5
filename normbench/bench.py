"""The performance benchmark's pieces; ``scripts/bench.py`` (``make bench``) runs them.

How every figure is measured: the candidates of a comparison (e.g. normbench's loop and a
hand-written loop) run in turns, the order rotating from one repetition to the next; each turn
is timed (synchronizing the GPU before and after), the ratio between two candidates is taken
within each repetition, i.e. between turns that ran seconds apart, and the item reports the
median of those ratios with their range. A machine whose load changes during the run (other
jobs on a shared CPU) therefore moves both sides of a ratio alike; absolute times (ms, images/s)
are reported too but are only as good as the machine was quiet.

The items (numbers as in the issue and the report):

1. ``framework_overhead``: normbench's training step (:meth:`Trainer.train_epoch`) against a
   minimal hand-written loop (forward, cross-entropy, zero_grad, backward, SGD step) with the
   same model, SGD settings and batches (pre-made, so data loading is not part of it).
2. ``virtual_workers``: a step with ``workers=8 batch=2`` (BN statistics per chunk of 2) against
   plain BN (one kernel call) on the same 16 images.
3. ``virtual_workers_epoch``: an epoch of the 8-worker batch-2 protocol (steps of 16 images)
   against the same images as 8x more steps of 2 images, both through normbench's loop and
   data pipeline.
4. ``norms``: each norm's training step against bn's, at batch 32 and 2 (x ``workers``).
5. ``data_loading``: images per second the input pipeline delivers (iterated alone) against
   images per second the model trains on.
6. ``gpu_resnet50`` (CUDA only): ResNet-50 training images per second, bn and gn, eager and
   compiled, bf16 autocast, channels_last as ``auto`` chooses.
7. ``fast_paths``: channels_last (and with ``--compile`` or on CUDA, torch.compile) against the
   plain eager NCHW step, for bn and gn.
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .fast_paths import apply_fast_paths
from .models import MODELS, build_model
from .norms import NORMS, set_total_steps
from .train import Trainer, autocast_dtype, parameter_groups

ROOT = Path(__file__).resolve().parents[1]
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
@dataclass
class Context:
    """What every item needs: the device, the run size and the base config (conf/ composed)."""

    device: torch.device
    base_config: dict[str, Any]  # the default run config as run.py composes it
    quick: bool = False
    repeats: int = 7
    workers: int = 8
    model: str = "resnet20"  # conf/model/ choice of the CPU items (base_config["model"])
    image_size: int = 32
    compile: bool = False  # also measure torch.compile in item 7 (always on CUDA)
    num_workers: int = 2  # DataLoader processes for the image-folder pipeline
    gpu_sizes: Sequence[int] = (32, 224)  # item 6: input sizes
    gpu_modes: Sequence[str] = ("eager", "compiled")  # item 6

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return autocast_dtype(self.base_config["precision"], self.device)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def config(self, **changes: Any) -> dict[str, Any]:
        """The base config with top-level keys and ``dataset`` / ``norm`` entries changed."""
        cfg = copy.deepcopy(self.base_config)
        for key, value in changes.items():
            if key in ("dataset", "norm", "model") and isinstance(value, Mapping):
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
                channels_last: str | bool = "auto", compile_mode: str | None = None
                ) -> nn.Module:
    """A model on the device, seeded, with the fast paths a run with these settings uses.
    ``model=None``: the base config's model (name, width, zero_init_last); else the registry's
    ``model`` at width 1 (as conf/model/<model>.yaml)."""
    node = ctx.base_config["model"] if model is None else {"name": model, "width": 1.0,
                                                           "zero_init_last": True}
    torch.manual_seed(0)
    net = build_model(node["name"], num_classes=num_classes, norm=norm,
                      norm_options=norm_options_for(norm, node["name"], node["width"]),
                      batch=batch, stem=stem_for(image_size or ctx.image_size),
                      width=node["width"], zero_init_last=node["zero_init_last"]).to(ctx.device)
    return apply_fast_paths(net, {"channels_last": channels_last,
                                  "compile": compile_mode is not None,
                                  "compile_mode": compile_mode or "default",
                                  "norm": {"name": norm}}, ctx.device)


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
    """The hand-written training loop: what a PyTorch user writes without a framework."""

    def __init__(self, ctx: Context, model: nn.Module,
                 batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 mark_cudagraph_steps: bool = False) -> None:
        optim = ctx.base_config["optim"]
        global_batch = len(batches[0][1])
        self.ctx, self.model, self.batches = ctx, model, batches
        self.optimizer = torch.optim.SGD(
            parameter_groups(model, optim["weight_decay"], optim["norm_weight_decay"]),
            lr=optim["lr_per_256"] * global_batch / 256, momentum=optim["momentum"],
            nesterov=optim["nesterov"])
        self.mark_cudagraph_steps = mark_cudagraph_steps
        set_total_steps(model, len(batches))  # BRN's schedule: one call is one run
        model.train()

    def __call__(self) -> None:
        for images, labels in self.batches:
            if self.mark_cudagraph_steps:
                torch.compiler.cudagraph_mark_step_begin()
            with self.ctx.autocast():
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
                train_size: int, model: str | None = None,
                image_size: int | None = None) -> Trainer:
    """normbench's Trainer on a synthetic data set of ``train_size`` images (no run folder:
    only :meth:`Trainer.train_epoch` is used); the model as in :func:`bench_model`."""
    node = ctx.base_config["model"] if model is None else {"name": model, "width": 1.0}
    cfg = ctx.config(batch=batch, workers=workers, model={**node, "stem": "cifar"},
                     norm={"name": norm, **norm_options_for(norm, node["name"], node["width"])},
                     dataset={"name": "synthetic", "train_size": train_size,
                              "test_size": max(batch * workers, 64),
                              "image_size": image_size or ctx.image_size},
                     progress=False, device=str(ctx.device))
    torch.manual_seed(0)
    return Trainer(cfg, folder=None)


def step_times(times: Mapping[str, Sequence[float]], name: str, steps: int) -> float:
    """Median milliseconds per step of candidate ``name`` (``steps`` steps per turn)."""
    return 1000 * statistics.median(times[name]) / steps


# ---- 1. framework overhead ------------------------------------------------------------------
def framework_overhead(ctx: Context) -> Item:
    item = Item("framework_overhead", 1, "normbench's training step vs a hand-written loop")
    batch, workers = 2, ctx.workers
    steps = 4 if ctx.quick else 8
    trainer = trainer_for(ctx, batch=batch, workers=workers, train_size=steps * batch * workers)
    batches = list(FixedBatches(_epoch_batches(trainer)))
    trainer.train_loader = FixedBatches(batches)
    minimal = MinimalLoop(ctx, copy.deepcopy(trainer.model), batches)
    times = time_in_turns({"normbench": trainer.train_epoch, "minimal": minimal},
                          ctx.repeats, ctx.device)
    ratio = Ratio.of(times, "normbench", "minimal")
    item.rows.append(Row(
        f"{ctx.model}, bn, batch {batch} x {workers} workers: Trainer.train_epoch / minimal loop",
        ratio, target="<= 1.05", passed=check(ratio, "<= 1.05"),
        details={"normbench_ms_per_step": step_times(times, "normbench", steps),
                 "minimal_ms_per_step": step_times(times, "minimal", steps),
                 "steps_per_turn": steps}))
    item.notes.append("Both loops take the same pre-made batches (data loading is item 5); "
                      "normbench's step adds the learning-rate schedule, the autocast context "
                      "and the per-step loss and error read-out (loss.item(): a GPU sync each "
                      "step on CUDA).")
    return item


def _epoch_batches(trainer: Trainer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    trainer.train_loader.set_epoch(0)
    return [(images.clone(), labels.clone()) for images, labels in trainer.train_loader]


# ---- 2. virtual workers: one step ------------------------------------------------------------
def virtual_workers(ctx: Context) -> Item:
    item = Item("virtual_workers", 2, "virtual workers (BN per chunk) vs plain BN, one step")
    batch, workers = 2, ctx.workers
    steps = 4 if ctx.quick else 8
    batches = random_batches(ctx, 2, batch * workers)
    loops = {"virtual": MinimalLoop(ctx, bench_model(ctx, "bn", batch), batches),
             "plain": MinimalLoop(ctx, bench_model(ctx, "bn", None), batches)}
    times = time_in_turns({k: _repeat(loop, steps // 2) for k, loop in loops.items()},
                          ctx.repeats, ctx.device)
    ratio = Ratio.of(times, "virtual", "plain")
    item.rows.append(Row(
        f"{ctx.model}, {batch * workers} images: bn with {workers} virtual workers of {batch} / "
        f"plain bn", ratio, target="<= 1.15", passed=check(ratio, "<= 1.15"),
        details={"virtual_ms_per_step": step_times(times, "virtual", steps),
                 "plain_ms_per_step": step_times(times, "plain", steps)}))
    item.notes.append("The chunked path is normbench.norms.ChunkBatchNorm: statistics of every "
                      "chunk in one pass (two reductions) and a hand-written backward; the "
                      "plain path is torch's batch_norm kernel.")
    return item


def _repeat(fn: Callable[[], Any], times: int) -> Callable[[], None]:
    def repeated() -> None:
        for _ in range(times):
            fn()
    return repeated


# ---- 3. virtual workers: an epoch -------------------------------------------------------------
def virtual_workers_epoch(ctx: Context) -> Item:
    item = Item("virtual_workers_epoch", 3,
                "an epoch of the 8-worker batch-2 protocol vs 8x more steps of 2 images")
    settings = [(None, ctx.image_size)]
    if not ctx.quick and ctx.model != "resnet8":
        settings.append(("resnet8", 16))  # the demo's model and image size: little compute
    for model, image_size in settings:
        item.rows.append(_epoch_speedup(ctx, model, image_size))
    item.notes.append("The speed-up of running the paper's 8 workers of 2 images as one step of "
                      "16 on one device; both epochs through Trainer.train_epoch with the "
                      "on-device data pipeline. The target is stated for the CPU. What one "
                      "step of 16 saves over 8 steps of 2 is the per-step cost (Python, kernel "
                      "launches, small-batch kernels): the more compute per image, the smaller "
                      "the saving on a CPU, whose compute per image barely depends on the batch.")
    return item


def _epoch_speedup(ctx: Context, model: str | None, image_size: int) -> Row:
    batch, workers = 2, ctx.workers
    images = (4 if ctx.quick else 32) * batch * workers
    virtual = trainer_for(ctx, batch=batch, workers=workers, train_size=images, model=model,
                          image_size=image_size)
    separate = trainer_for(ctx, batch=batch, workers=1, train_size=images, model=model,
                           image_size=image_size)
    times = time_in_turns({"virtual": virtual.train_epoch, "separate": separate.train_epoch},
                          max(3, ctx.repeats - 2), ctx.device)
    speedup = Ratio.of(times, "separate", "virtual")
    target = ">= 3" if ctx.device.type == "cpu" else None
    return Row(
        f"{model or ctx.model} at {image_size}x{image_size}, bn, {images} images: epoch of "
        f"{len(separate.train_loader)} steps of {batch} / epoch of {len(virtual.train_loader)} "
        f"steps of {batch * workers} ({workers} virtual workers)",
        speedup, target=target, passed=check(speedup, target) if target else None,
        details={"virtual_epoch_s": statistics.median(times["virtual"]),
                 "separate_epoch_s": statistics.median(times["separate"]),
                 "virtual_images_per_s": images / statistics.median(times["virtual"]),
                 "separate_images_per_s": images / statistics.median(times["separate"])})


# ---- 4. every norm against bn ----------------------------------------------------------------
def norms(ctx: Context) -> Item:
    item = Item("norms", 4, "each norm's training step relative to bn (same model and images)")
    for batch in (4, 2) if ctx.quick else (32, 2):
        images = batch * ctx.workers
        steps = max(1, (64 if not ctx.quick else 16) // images)
        data = random_batches(ctx, 1, images)
        loops = {name: MinimalLoop(ctx, bench_model(ctx, name, batch), data) for name in NORMS}
        times = time_in_turns({k: _repeat(loop, steps) for k, loop in loops.items()},
                              max(3, ctx.repeats - 2), ctx.device)
        for name in NORMS:
            item.rows.append(Row(f"{ctx.model}, batch {batch} x {ctx.workers}: {name} / bn",
                                 Ratio.of(times, name, "bn"),
                                 details={"ms_per_step": step_times(times, name, steps)}))
    item.notes.append("gn and evonorm_s0 use 8 groups on the CIFAR ResNets (their 16-channel "
                      "stage); frn and the EvoNorms replace the activation. No targets: this "
                      "says what a sweep over norms costs.")
    return item


# ---- 5. data loading ---------------------------------------------------------------------------
def data_loading(ctx: Context) -> Item:
    item = Item("data_loading", 5, "images/s the input pipeline delivers vs what the model "
                                   "trains on")
    from .data import build_loaders

    models: list[str | None] = ["resnet8"] if ctx.quick or ctx.model == "resnet8" \
        else ["resnet8", None]
    if ctx.device.type == "cuda":
        models.append("resnet50")  # the GPU target: ResNet-50 (cifar stem at 32x32)
    for batch in (2, 32):
        global_batch = batch * ctx.workers
        steps = 2 if ctx.quick else max(2, 256 // global_batch)
        cfg = ctx.config(dataset={"name": "synthetic", "train_size": 4096 if not ctx.quick
                                  else 512, "image_size": ctx.image_size})
        loader, _, _ = build_loaders(cfg["dataset"], global_batch=global_batch, eval_batch=500,
                                     seed=0, device=ctx.device, num_workers=0)
        loader.set_epoch(0)
        batches = []
        for images, labels in loader:
            batches.append((images, labels))
            if len(batches) == steps:
                break

        def pipeline(epoch=[0]) -> None:  # steps batches of a fresh epoch, as training sees them
            epoch[0] += 1
            loader.set_epoch(epoch[0])
            for index, _ in enumerate(loader, 1):
                if index == steps:
                    break

        for model in models:
            loop = MinimalLoop(ctx, bench_model(ctx, "bn", batch, model=model), batches)
            model = model or ctx.model
            times = time_in_turns({"pipeline": pipeline, "model": loop}, ctx.repeats,
                                  ctx.device)
            ratio = Ratio.of(times, "model", "pipeline")
            images = steps * global_batch
            item.rows.append(Row(
                f"{model}, bn, batch {batch} x {ctx.workers}: on-device pipeline images/s / "
                f"training images/s", ratio, target=">= 3", passed=check(ratio, ">= 3"),
                details={"pipeline_images_per_s": images / statistics.median(times["pipeline"]),
                         "model_images_per_s": images / statistics.median(times["model"])}))
    if ctx.quick:
        item.notes.append("Quick mode: the image-folder pipeline is not measured.")
    else:
        item.rows.append(_folder_pipeline(ctx))
    item.notes.append("The tensor pipeline (synthetic, CIFAR-10/100, image folders with preset "
                      "cifar) keeps the uint8 data set on the device and crops and flips there. "
                      "The image-folder pipeline (preset imagenet) decodes JPEGs in DataLoader "
                      f"processes ({ctx.num_workers} here): its row compares it with ResNet-50 "
                      "at 224x224; the target applies on a GPU.")
    return item


def _folder_pipeline(ctx: Context) -> Row:
    """The image-folder (imagenet preset) pipeline against ResNet-50 training at 224."""
    from .data import build_loaders

    count, global_batch = 96, 32
    batch = 4 if ctx.device.type == "cpu" else 32  # ResNet-50 at 224 on a CPU: seconds a step
    with tempfile.TemporaryDirectory(prefix="normbench-bench-") as root:
        _write_jpeg_folder(Path(root), count)
        cfg = ctx.config(dataset={"name": "imagefolder", "preset": "imagenet", "root": root,
                                  "image_size": 224, "num_classes": 2, "augment": True,
                                  "cache_dir": root, "mean": [0.485, 0.456, 0.406],
                                  "std": [0.229, 0.224, 0.225], "class_list": None,
                                  "max_per_class": None, "max_test_per_class": None,
                                  "skip_corrupt": False, "test_dir": "auto"})
        loader, _, _ = build_loaders(cfg["dataset"], global_batch=global_batch, eval_batch=32,
                                     seed=0, device=ctx.device, num_workers=ctx.num_workers)
        epoch = [0]

        def pipeline() -> None:  # one epoch, fresh augmentation
            epoch[0] += 1
            loader.set_epoch(epoch[0])
            for _ in loader:
                pass

        loop = MinimalLoop(ctx, bench_model(ctx, "bn", None, model="resnet50", image_size=224,
                                            num_classes=1000),
                           random_batches(ctx, 1, batch, image_size=224, num_classes=1000))
        times = time_in_turns({"pipeline": pipeline, "model": loop}, 3, ctx.device)
        images = len(loader) * global_batch
        del loader  # ends the DataLoader processes before the folder goes
    pipeline_ips = images / statistics.median(times["pipeline"])
    model_ips = batch / statistics.median(times["model"])
    # per repetition: (images / t_pipeline) / (batch / t_model)
    ratio = Ratio.of({"model": [t * images / batch for t in times["model"]],
                      "pipeline": times["pipeline"]}, "model", "pipeline")
    target = ">= 3" if ctx.device.type == "cuda" else None
    return Row(f"resnet50 at 224, bn, batch {batch}: image-folder pipeline images/s "
               f"({ctx.num_workers} DataLoader processes, JPEG 500x375) / training images/s",
               ratio, target=target, passed=check(ratio, target) if target else None,
               details={"pipeline_images_per_s": pipeline_ips, "model_images_per_s": model_ips})


def _write_jpeg_folder(root: Path, count: int) -> None:
    """``count`` JPEGs of 500x375 (ImageNet's typical size) in two classes, train and val."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split, n in (("train", count), ("val", 4)):
        for index in range(n):
            folder = root / split / f"class{index % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            # smooth content, like a photograph (noise would make the JPEG unusually large)
            small = torch.rand(3, 12, 16, generator=generator)
            image = F.interpolate(small[None], size=(375, 500), mode="bicubic",
                                  align_corners=False)[0].clamp(0, 1)
            array = (image.permute(1, 2, 0) * 255).to(torch.uint8).numpy()
            Image.fromarray(array).save(folder / f"{index:05d}.jpg", quality=90)


# ---- 6. ResNet-50 on a GPU ---------------------------------------------------------------------
def gpu_resnet50(ctx: Context, *, model: str = "resnet50",
                 settings: Sequence[tuple[int, int]] = ((32, 8), (2, 8)),
                 sizes: Sequence[int] | None = None, modes: Sequence[str] | None = None,
                 min_images: int = 512) -> Item:
    item = Item("gpu_resnet50", 6, "ResNet-50 training images/s, bn and gn, eager and compiled")
    if ctx.device.type != "cuda" and model == "resnet50":
        item.skipped = ("not measured: no GPU on this machine (run `python scripts/bench.py "
                        "--device cuda` on one)")
        return item
    is_h100 = ctx.device.type == "cuda" and "H100" in torch.cuda.get_device_name(ctx.device)
    for size in sizes or ctx.gpu_sizes:
        for batch, workers in settings:
            images = batch * workers
            steps = max(2, min_images // images)
            for mode in modes or ctx.gpu_modes:
                compile_mode = None
                if mode == "compiled":
                    compile_mode = "reduce-overhead" if images < 64 else "default"
                torch._dynamo.reset()
                data = random_batches(ctx, 1, images, image_size=size, num_classes=1000)
                loops = {norm: MinimalLoop(
                    ctx, bench_model(ctx, norm, batch, model=model, image_size=size,
                                     num_classes=1000, compile_mode=compile_mode),
                    data, mark_cudagraph_steps=compile_mode == "reduce-overhead")
                    for norm in ("bn", "gn")}
                times = time_in_turns({k: _repeat(loop, steps) for k, loop in loops.items()},
                                      max(3, ctx.repeats - 2), ctx.device,
                                      warmup=2 if compile_mode else 1)
                ips = {k: images * steps / statistics.median(v) for k, v in times.items()}
                label = (f"{model} {size}x{size} ({stem_for(size)} stem), batch {batch} x "
                         f"{workers}, {mode}{f' ({compile_mode})' if compile_mode else ''}")
                ratio = Ratio.of(times, "bn", "gn")  # time(bn) / time(gn) = speed(gn) / speed(bn)
                item.rows.append(Row(f"{label}: gn images/s / bn images/s", ratio,
                                     target=">= 0.8", passed=check(ratio, ">= 0.8"),
                                     details={"bn_images_per_s": ips["bn"],
                                              "gn_images_per_s": ips["gn"]}))
                if size == 224 and batch == 32:
                    target = ">= 3000" if is_h100 and ctx.amp_dtype == torch.bfloat16 else None
                    value = Ratio(ips["bn"], ips["bn"], ips["bn"], 1)
                    item.rows.append(Row(f"{label}: bn images/s", value, unit="images/s",
                                         target=target,
                                         passed=check(value, target) if target else None))
                del loops
    item.notes.append("bf16 autocast when precision resolves to it (auto on CUDA); "
                      "channels_last as `auto` chooses (on for bn, off for gn); compiled: "
                      "torch.compile default mode at 256 images per step, reduce-overhead (CUDA "
                      "graphs) at 16. The 3000 images/s target is for an H100 with bf16.")
    return item


# ---- 7. fast paths on this device --------------------------------------------------------------
def fast_paths(ctx: Context) -> Item:
    item = Item("fast_paths", 7, "channels_last and torch.compile vs the plain eager NCHW step")
    batch = 2
    images = batch * ctx.workers
    steps = 4 if ctx.quick else 8
    data = random_batches(ctx, 1, images)
    compile_too = ctx.compile or ctx.device.type == "cuda"
    for norm in ("bn", "gn"):
        candidates = {"nchw": bench_model(ctx, norm, batch, channels_last=False),
                      "channels_last": bench_model(ctx, norm, batch, channels_last=True)}
        if compile_too:
            torch._dynamo.reset()
            candidates["compiled"] = bench_model(ctx, norm, batch, channels_last=False,
                                                 compile_mode="default")
        loops = {k: _repeat(MinimalLoop(ctx, m, data), steps) for k, m in candidates.items()}
        times = time_in_turns(loops, ctx.repeats, ctx.device)
        for name in candidates:
            if name == "nchw":
                continue
            speedup = Ratio.of(times, "nchw", name)
            item.rows.append(Row(f"{ctx.model}, {norm}, batch {batch} x {ctx.workers}: speed "
                                 f"with {name} / eager NCHW", speedup,
                                 details={"ms_per_step": step_times(times, name, steps),
                                          "nchw_ms_per_step": step_times(times, "nchw", steps)}))
    if not compile_too:
        item.notes.append("torch.compile not measured on the CPU (minutes of compilation); "
                          "pass --compile to measure it.")
    item.notes.append("Above 1: the fast path is faster. `channels_last: auto` stays off on the "
                      "CPU; on CUDA it follows the norm's registry entry.")
    return item


ITEMS: dict[int, Callable[[Context], Item]] = {
    1: framework_overhead, 2: virtual_workers, 3: virtual_workers_epoch, 4: norms,
    5: data_loading, 6: gpu_resnet50, 7: fast_paths,
}


# ---- where it ran ------------------------------------------------------------------------------
def hardware(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu, "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _memory_gib(), "platform": platform.platform(),
        "gpu": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
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
    import torchvision

    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
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
