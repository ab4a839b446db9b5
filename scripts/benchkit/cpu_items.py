"""The items that run on any device: 1 framework overhead, 2 per-worker BN, 3 an epoch of
virtual workers (with where the time goes), 4 norms, 5 data loading, 7 torch.compile.
Every step runs as the context's :class:`~benchkit.measure.Variant` (the default path unless
``--variant today``)."""

from __future__ import annotations

import copy
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from normbench.norms import CHUNKED_BN_VARIANTS, NORMS, chunked_bn_variant
from normbench.train import Trainer

from .measure import (Context, FixedBatches, Item, MinimalLoop, Ratio, Row, Variant, bench_model,
                      check, random_batches, repeat, step_times, time_in_turns, trainer_for)


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
                      "normbench's step adds the learning-rate schedule, the inputs' memory "
                      "format and the loss and error sums kept on the device (read once per "
                      "epoch).")
    return item


def _epoch_batches(trainer: Trainer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    trainer.train_loader.set_epoch(0)
    return [(images.clone(), labels.clone()) for images, labels in trainer.train_loader]


# ---- 2. virtual workers: one step ------------------------------------------------------------
def virtual_workers(ctx: Context) -> Item:
    item = Item("virtual_workers", 2, "per-worker BN (statistics per chunk) vs plain BN, one "
                                      "step, each implementation, precision and layout")
    workers = ctx.workers
    precisions = ["fp32"] + (["bf16"] if _bf16_native(ctx) else [])
    for batch in (2,) if ctx.quick else (2, 32):
        steps = 2 if batch > 2 else (4 if ctx.quick else 8)  # pairs of steps per turn
        batches = random_batches(ctx, 2 if batch == 2 else 1, batch * workers)
        for precision in precisions:
            for layout in (False, True):
                variants = {name: Variant(name, precision, layout, name)
                            for name in CHUNKED_BN_VARIANTS}
                loops = {name: MinimalLoop(ctx, bench_model(ctx, "bn", batch, variant=v),
                                           batches, variant=v) for name, v in variants.items()}
                plain = Variant("plain", precision, layout)
                loops["plain"] = MinimalLoop(ctx, bench_model(ctx, "bn", None, variant=plain),
                                             batches, variant=plain)
                per_turn = max(1, steps // len(batches))
                times = time_in_turns({k: repeat(loop, per_turn) for k, loop in loops.items()},
                                      ctx.repeats if batch == 2 else max(3, ctx.repeats - 2),
                                      ctx.device)
                where = f"{precision}, {'channels_last' if layout else 'NCHW'}"
                for name in CHUNKED_BN_VARIANTS:
                    ratio = Ratio.of(times, name, "plain")
                    default = _is_default(name, ctx, layout)
                    target = "<= 1.15" if default and batch == 2 else None
                    item.rows.append(Row(
                        f"{ctx.model}, {where}, batch {batch} x {workers}: bn per worker, "
                        f"{name}{' (default)' if default else ''} / plain bn", ratio,
                        target=target, passed=check(ratio, target) if target else None,
                        details={"ms_per_step": step_times(times, name,
                                                           per_turn * len(batches)),
                                 "plain_ms_per_step": step_times(times, "plain",
                                                                 per_turn * len(batches))}))
    item.notes.append("normbench.norms: per_worker = the library's batch_norm kernel once per "
                      "worker and one copy (cat); folded = one kernel call with the workers "
                      "folded into the channels, a copy in and out; hand_written = "
                      "ChunkBatchNorm, the implementation before issue #13. plain = one "
                      "kernel call over all the step's images (no per-worker statistics).")
    return item


def _bf16_native(ctx: Context) -> bool:
    """Whether precision=auto resolves to bf16 here (CUDA, or a CPU with bf16 units)."""
    return Variant("auto").amp_dtype(ctx.device) == torch.bfloat16


def _is_default(name: str, ctx: Context, channels_last: bool) -> bool:
    """Whether ``name`` is the per-worker BN the device uses by default in that layout."""
    x = torch.empty(2, 2, 2, 2, device=ctx.device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return chunked_bn_variant(x) == name


# ---- 3. virtual workers: an epoch -------------------------------------------------------------
def virtual_workers_epoch(ctx: Context) -> Item:
    item = Item("virtual_workers_epoch", 3,
                "an epoch of the 8-worker batch-2 protocol vs 8x more steps of 2 images")
    settings = [(None, ctx.image_size)]
    if not ctx.quick and ctx.model != "resnet8":
        settings.append(("resnet8", 16))  # the demo's model and image size: little compute
    for model, image_size in settings:
        row = _epoch_speedup(ctx, model, image_size)
        item.rows.append(row)
        if row.passed is False and model is None:
            item.notes += where_the_time_goes(ctx, row)
    item.notes.append("The speed-up of running the paper's 8 workers of 2 images as one step of "
                      "16 on one device; both epochs through Trainer.train_epoch with the "
                      "on-device data pipeline, precision, layout and per-worker BN as the "
                      f"{ctx.variant.name} path chooses. The target is stated for the CPU.")
    return item


def _epoch_speedup(ctx: Context, model: str | None, image_size: int) -> Row:
    batch, workers = 2, ctx.workers
    images = (4 if ctx.quick else 32) * batch * workers
    virtual = trainer_for(ctx, batch=batch, workers=workers, train_size=images, model=model,
                          image_size=image_size)
    separate = trainer_for(ctx, batch=batch, workers=1, train_size=images, model=model,
                           image_size=image_size)
    times = time_in_turns({"virtual": ctx.variant.run(virtual.train_epoch),
                           "separate": ctx.variant.run(separate.train_epoch)},
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
                 "separate_images_per_s": images / statistics.median(times["separate"]),
                 "virtual_ms_per_step": 1000 * statistics.median(times["virtual"])
                 / len(virtual.train_loader),
                 "separate_ms_per_step": 1000 * statistics.median(times["separate"])
                 / len(separate.train_loader)})


# What an op of the profile is, by its name (torch.profiler's aten op names; first match wins).
OP_CLASSES = (
    ("convolution", ("conv", "mkldnn_convolution", "onednn")),
    ("normalization", ("batch_norm", "native_batch_norm", "group_norm")),
    ("optimizer (SGD)", ("sgd", "_foreach", "lerp")),
    ("copies", ("cat", "copy_", "clone", "contiguous", "to_copy", "_to_copy", "empty_like")),
    ("elementwise and activations", ("relu", "threshold", "add", "mul", "sub", "div", "where",
                                     "fill_", "zero_")),
    ("loss, pooling and linear", ("cross_entropy", "nll_loss", "log_softmax", "pool", "mean",
                                  "addmm", "mm", "linear", "sum")),
)


def where_the_time_goes(ctx: Context, row: Row) -> list[str]:
    """Why an epoch of 8 virtual workers is not 3x faster than 8x more steps of 2: the fixed
    cost per step and the cost per image from the two step times, and the same split per op
    class from a profile of one step of each kind."""
    t2, t16 = row.details["separate_ms_per_step"], row.details["virtual_ms_per_step"]
    fixed, per_image = _line_through(t2, t16)
    notes = [
        f"Where the time goes ({ctx.model}): a step of 2 images takes {t2:.1f} ms, a step of 16 "
        f"takes {t16:.1f} ms. As a line through these two points a step costs {fixed:.1f} ms "
        f"however many images it has, plus {per_image:.2f} ms per image. One step of 16 instead "
        f"of 8 steps of 2 saves 7 of the fixed costs only: the speed-up is 8 (f + 2 b) / "
        f"(f + 16 b), {8 * t2 / t16:.2f} here, and reaches 3x only when the fixed cost f is at "
        f"least 6.4x the per-image cost b ({6.4 * per_image:.1f} ms here, against "
        f"{fixed:.1f} ms)."]
    profile = {size: profile_step(ctx, size) for size in (2, 16)}
    split = []
    for name in profile[2]:
        f, b = _line_through(profile[2][name], profile[16][name])
        split.append((b, f"{name} {f:.1f} + {b:.2f}/image"))
    split.sort(reverse=True)
    notes.append(f"The same split per op class, from a profile of one step of 2 and one of 16 "
                 f"(torch.profiler, self CPU time, ms per step = fixed + per image; the profiler "
                 f"adds its own cost per op), largest per-image cost first: "
                 f"{'; '.join(text for _, text in split)}. The per-image terms are what one "
                 f"step of 16 cannot save; on a CPU they stay when the batch grows, where a "
                 f"GPU's idle units would absorb them.")
    return notes


def _line_through(t2: float, t16: float) -> tuple[float, float]:
    """(fixed, per image) of t(n) = fixed + n * per_image through (2, t2) and (16, t16)."""
    per_image = (t16 - t2) / 14
    return t2 - 2 * per_image, per_image


def profile_step(ctx: Context, images: int, *, norm: str = "bn", model: str | None = None,
                 image_size: int | None = None, variant: Variant | None = None
                 ) -> dict[str, float]:
    """Milliseconds of self CPU time per op class in one training step of ``images`` images
    (virtual workers of 2 when there are more than 2), averaged over a few steps."""
    from torch.profiler import ProfilerActivity, profile

    variant = variant or ctx.variant
    batch = 2 if images > 2 else None
    loop = MinimalLoop(ctx, bench_model(ctx, norm, batch, model=model, image_size=image_size,
                                        variant=variant),
                       random_batches(ctx, 1, images, image_size=image_size), variant=variant)
    loop()  # warm-up
    steps = 4
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            loop()
    totals = {name: 0.0 for name, _ in OP_CLASSES}
    totals["other"] = 0.0
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue
        op = event.key[len("aten::"):]
        name = next((n for n, keys in OP_CLASSES if any(k in op for k in keys)), "other")
        totals[name] += event.self_cpu_time_total / 1000 / steps
    return totals


# ---- 4. every norm against bn ----------------------------------------------------------------
def norms(ctx: Context) -> Item:
    item = Item("norms", 4, "each norm's training step relative to bn (same model and images)")
    for batch in (4, 2) if ctx.quick else (32, 2):
        images = batch * ctx.workers
        steps = max(1, (64 if not ctx.quick else 16) // images)
        data = random_batches(ctx, 1, images)
        loops = {name: MinimalLoop(ctx, bench_model(ctx, name, batch), data) for name in NORMS}
        times = time_in_turns({k: repeat(loop, steps) for k, loop in loops.items()},
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
    from normbench.data import build_loaders

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
    from normbench.data import build_loaders

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


# ---- 7. torch.compile on this device -----------------------------------------------------------
def fast_paths(ctx: Context) -> Item:
    item = Item("fast_paths", 7, "torch.compile vs the eager step (layout as auto chooses)")
    if not (ctx.compile or ctx.device.type == "cuda"):
        item.skipped = ("not measured: torch.compile takes minutes to compile on the CPU; pass "
                        "--compile to measure it (channels_last is item 9)")
        return item
    batch = 2
    images = batch * ctx.workers
    steps = 4 if ctx.quick else 8
    data = random_batches(ctx, 1, images)
    for norm in ("bn", "gn"):
        torch._dynamo.reset()
        candidates = {"eager": bench_model(ctx, norm, batch),
                      "compiled": bench_model(ctx, norm, batch, compile_mode="default")}
        loops = {k: repeat(MinimalLoop(ctx, m, data), steps) for k, m in candidates.items()}
        times = time_in_turns(loops, ctx.repeats, ctx.device)
        speedup = Ratio.of(times, "eager", "compiled")
        item.rows.append(Row(f"{ctx.model}, {norm}, batch {batch} x {ctx.workers} "
                             f"({ctx.variant.describe(norm, ctx.device)}): speed compiled / "
                             f"eager", speedup,
                             details={"ms_per_step": step_times(times, "compiled", steps),
                                      "eager_ms_per_step": step_times(times, "eager", steps)}))
    item.notes.append("Above 1: the compiled step is faster.")
    return item
