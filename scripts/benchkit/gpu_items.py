"""Item 6, the GPU rows (CUDA only): ResNet-50 training images/s with bn and gn in bf16, eager
and compiled, in channels_last and as ``channels_last: auto`` chooses; the GN/BN ratio; CUDA
graphs (compile mode reduce-overhead) at batch 2 x 8; and the per-worker BN implementations
against each other on the GPU (which one :data:`normbench.norms.CHUNKED_BN_DEFAULT` should name
for CUDA)."""

from __future__ import annotations

import statistics
from typing import Sequence

import torch

from normbench.norms import CHUNKED_BN_VARIANTS

from .measure import (Context, Item, MinimalLoop, Ratio, Row, Variant, bench_model, check,
                      random_batches, repeat, stem_for, time_in_turns)


def gpu_resnet50(ctx: Context, *, model: str = "resnet50",
                 settings: Sequence[tuple[int, int]] = ((32, 8), (2, 8)),
                 sizes: Sequence[int] | None = None, modes: Sequence[str] | None = None,
                 min_images: int = 512) -> Item:
    item = Item("gpu_resnet50", 6, "ResNet-50 training images/s, bn and gn, eager and compiled")
    if ctx.device.type != "cuda" and model == "resnet50":
        item.skipped = ("not measured: no GPU on this machine (run `python scripts/bench.py "
                        "--device cuda` on one, or `make gpu-check`)")
        return item
    is_h100_class = ctx.device.type == "cuda" and any(
        name in torch.cuda.get_device_name(ctx.device) for name in ("H100", "H200", "H800"))
    # (norm, layout) candidates: bn and gn in channels_last (the rows), gn also NCHW
    # (what channels_last=auto picks for gn on CUDA: torch's GroupNorm kernel is slower in NHWC)
    candidates = {"bn": ("bn", True), "gn": ("gn", True), "gn_nchw": ("gn", False)}
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
                # compiling ResNet-50 takes minutes: compiled rows for the auto layouts only
                chosen = candidates if compile_mode is None else {
                    k: v for k, v in candidates.items() if k != "gn"}
                loops = {key: MinimalLoop(
                    ctx, bench_model(ctx, norm, batch, model=model, image_size=size,
                                     num_classes=1000, channels_last=layout,
                                     compile_mode=compile_mode),
                    data, mark_cudagraph_steps=compile_mode == "reduce-overhead")
                    for key, (norm, layout) in chosen.items()}
                times = time_in_turns({k: repeat(loop, steps) for k, loop in loops.items()},
                                      max(3, ctx.repeats - 2), ctx.device,
                                      warmup=3 if compile_mode else 1)
                ips = {k: images * steps / statistics.median(v) for k, v in times.items()}
                label = (f"{model} {size}x{size} ({stem_for(size)} stem), bf16, batch {batch} x "
                         f"{workers}, {mode}{f' ({compile_mode})' if compile_mode else ''}")
                for gn in (k for k in loops if k.startswith("gn")):
                    layout = "channels_last" if candidates[gn][1] else "NCHW"
                    ratio = Ratio.of(times, "bn", gn)  # time(bn) / time(gn) = speed gn / bn
                    item.rows.append(Row(
                        f"{label}: gn ({layout}) images/s / bn (channels_last) images/s", ratio,
                        target=">= 0.8", passed=check(ratio, ">= 0.8"),
                        details={"bn_images_per_s": ips["bn"], "gn_images_per_s": ips[gn]}))
                if size == 224:
                    target = (">= 3000" if is_h100_class and batch == 32
                              and ctx.amp_dtype == torch.bfloat16 else None)
                    for key in loops:
                        value = Ratio(ips[key], ips[key], ips[key], 1)
                        norm, layout = candidates[key]
                        item.rows.append(Row(
                            f"{label}: {norm} ({'channels_last' if layout else 'NCHW'}) "
                            f"images/s", value, unit="images/s",
                            target=target if key == "bn" else None,
                            passed=check(value, target) if target and key == "bn" else None))
                del loops
    if ctx.device.type == "cuda":
        item.rows += per_worker_bn_on_gpu(ctx, model=model, size=max(sizes or ctx.gpu_sizes))
    item.notes.append("bf16 autocast (precision auto on CUDA); compiled: torch.compile default "
                      "mode at 256 images per step, reduce-overhead (CUDA graphs) at 16; "
                      "compiled rows for bn in channels_last and gn in NCHW (the layouts "
                      "channels_last=auto picks on CUDA). The 3,000 images/s target is for an "
                      "H100-class GPU in bf16 at batch 32 x 8.")
    return item


def per_worker_bn_on_gpu(ctx: Context, *, model: str, size: int) -> list[Row]:
    """Each per-worker BN implementation against plain BN (no per-worker statistics), eager,
    bn in channels_last, batch 2 x 8: which implementation is fastest on this GPU."""
    batch, workers = 2, 8
    images, steps = batch * workers, 16
    data = random_batches(ctx, 1, images, image_size=size, num_classes=1000)
    variants = {name: Variant(name, chunked_bn=name) for name in CHUNKED_BN_VARIANTS}
    loops = {name: MinimalLoop(ctx, bench_model(ctx, "bn", batch, model=model, image_size=size,
                                                num_classes=1000, variant=v),
                               data, variant=v) for name, v in variants.items()}
    loops["plain"] = MinimalLoop(ctx, bench_model(ctx, "bn", None, model=model,
                                                  image_size=size, num_classes=1000), data)
    times = time_in_turns({k: repeat(loop, steps) for k, loop in loops.items()},
                          max(3, ctx.repeats - 2), ctx.device)
    return [Row(f"{model} {size}x{size}, bf16, eager, batch {batch} x {workers}: bn with "
                f"per-worker statistics, {name} / plain bn (step time)", Ratio.of(times, name,
                                                                                  "plain"),
                details={"images_per_s": images * steps / statistics.median(times[name])})
            for name in CHUNKED_BN_VARIANTS]
