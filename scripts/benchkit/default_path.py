"""The items of issue #13's CPU fast path: 8 the default path against today's, side by side;
9 the layout rule of ``channels_last: auto`` (normbench.fast_paths); 10 bf16 does not move
results (a short real training run, fp32 against bf16, against the seed-to-seed spread)."""

from __future__ import annotations

import statistics

import torch

from normbench.fast_paths import use_channels_last
from normbench.machine import cpu_has_bf16

from .cpu_items import profile_step
from .measure import (DEFAULT, TODAY, Context, Item, MinimalLoop, Ratio, Row, Variant,
                      bench_model, check, random_batches, step_times, time_in_turns, trainer_for)

SETTINGS = ((32, 8), (2, 8))  # (images per worker, workers): the batch 32 x 8 and 2 x 8


def _models(ctx: Context) -> tuple[tuple[str, int], ...]:
    """(model, image size): ResNet-8 and ResNet-20 at 32x32 (ResNet-8 at 16x16 when quick)."""
    return (("resnet8", 16),) if ctx.quick else (("resnet8", 32), ("resnet20", 32))


def _steps(images: int, quick: bool) -> int:
    """Steps per timed turn: about 128 images (32 when quick), at least one step."""
    return max(1, (32 if quick else 128) // images)


# ---- 8. the default path against today's ---------------------------------------------------------
def default_vs_today(ctx: Context) -> Item:
    item = Item("default_vs_today", 8, "training throughput: the default path vs today's "
                                       "(fp32, NCHW, hand-written per-worker BN, "
                                       "per-parameter SGD)")
    bf16_cpu = ctx.device.type == "cpu" and cpu_has_bf16()
    target = ">= 1.5" if bf16_cpu else None
    for model, size in _models(ctx):
        for norm in ("bn", "gn"):
            for batch, workers in SETTINGS:
                images = batch * workers
                steps = _steps(images, ctx.quick)
                trainers = {v.name: trainer_for(ctx, batch=batch, workers=workers, norm=norm,
                                                model=model, image_size=size, variant=v,
                                                train_size=steps * images)
                            for v in (TODAY, DEFAULT)}
                times = time_in_turns({v.name: v.run(trainers[v.name].train_epoch)
                                       for v in (TODAY, DEFAULT)},
                                      max(3, ctx.repeats - 2), ctx.device)
                speedup = Ratio.of(times, "today", "default")
                name = "gn8" if norm == "gn" else norm
                row = Row(
                    f"{model} {size}x{size}, {name}, batch {batch} x {workers}: default "
                    f"({DEFAULT.describe(norm, ctx.device)}) images/s / today's",
                    speedup, target=target, passed=check(speedup, target) if target else None,
                    details={"default_images_per_s": images * steps
                             / statistics.median(times["default"]),
                             "today_images_per_s": images * steps
                             / statistics.median(times["today"]),
                             "default_ms_per_step": step_times(times, "default", steps),
                             "today_ms_per_step": step_times(times, "today", steps)})
                item.rows.append(row)
                if row.passed is False:
                    item.notes.append(_where_the_speed_up_goes(ctx, row, model, size, norm,
                                                               images))
    item.notes.append("Both through Trainer.train_epoch (on-device synthetic data), in turns. "
                      "today: precision=fp32 channels_last=false, the hand-written "
                      "per-worker BN (normbench.norms.ChunkBatchNorm) and SGD's per-parameter "
                      "loop, the path before issue #13; default: precision=auto, "
                      "channels_last=auto, the device's per-worker BN and fused SGD. gn has 8 "
                      "groups (conf/norm/gn8.yaml). The training-step changes of #13 item 4 (no "
                      "host read per step) are in both.")
    if not bf16_cpu and ctx.device.type == "cpu":
        item.notes.append("This CPU has no bf16 units: precision=auto is fp32 here, and the "
                          "1.5x target (stated for a bf16-capable CPU) does not apply.")
    return item


def _where_the_speed_up_goes(ctx: Context, row: Row, model: str, size: int, norm: str,
                             images: int) -> str:
    """Per op class, a step's time on today's path and on the default one (a profile)."""
    profiles = {v.name: profile_step(ctx, images, norm=norm, model=model, image_size=size,
                                     variant=v) for v in (TODAY, DEFAULT)}
    classes = sorted(profiles["today"], key=lambda k: -profiles["today"][k])
    shown = "; ".join(f"{k} {profiles['today'][k]:.1f} -> {profiles['default'][k]:.1f}"
                      for k in classes)
    return (f"Below the target, {row.what.split(':')[0]}: ms per step by op class, today -> "
            f"default (torch.profiler, self CPU time; the profiler adds its own cost per op): "
            f"{shown}. The classes that shrink least (or grow: autocast's casts of the weights "
            f"to bf16 in every step count as copies) are what keeps this step below the "
            f"target.")


# ---- 9. the layout rule --------------------------------------------------------------------------
def layouts(ctx: Context) -> Item:
    item = Item("layouts", 9, "channels_last vs NCHW per model, norm, precision and batch (what "
                              "channels_last=auto decides)")
    precisions = ["fp32"] + (["bf16"] if DEFAULT.amp_dtype(ctx.device) == torch.bfloat16
                             else [])
    for model, size in _models(ctx):
        for norm in ("bn", "gn"):
            for precision in precisions:
                variant = Variant(precision, precision=precision)
                auto = use_channels_last("auto", norm, ctx.device, variant.amp_dtype(ctx.device))
                for batch, workers in SETTINGS:
                    images = batch * workers
                    steps = _steps(images, ctx.quick)
                    data = random_batches(ctx, 1, images, image_size=size)
                    loops = {str(layout): MinimalLoop(
                        ctx, bench_model(ctx, norm, batch, model=model, image_size=size,
                                         channels_last=layout, variant=variant),
                        data * steps, variant=variant) for layout in (False, True)}
                    times = time_in_turns(loops, max(3, ctx.repeats - 2), ctx.device)
                    speedup = Ratio.of(times, "False", "True")
                    name = "gn8" if norm == "gn" else norm
                    faster = speedup.median > 1
                    item.rows.append(Row(
                        f"{model} {size}x{size}, {name}, {precision}, batch {batch} x {workers}: "
                        f"speed channels_last / NCHW (auto: "
                        f"{'channels_last' if auto else 'NCHW'})", speedup,
                        details={"channels_last_ms_per_step": step_times(times, "True", steps),
                                 "nchw_ms_per_step": step_times(times, "False", steps),
                                 "auto_picks_the_faster": auto == faster}))
    item.notes.append("Above 1: channels_last is faster. Hand-written loop (MinimalLoop), the "
                      "device's per-worker BN. The rule channels_last=auto follows on the CPU "
                      "is normbench.fast_paths.CPU_CHANNELS_LAST (per norm and precision, not "
                      "per batch); auto_picks_the_faster says whether it agrees with this row.")
    return item


# ---- 10. bf16 does not move results --------------------------------------------------------------
# A short real training run: ResNet-8 on the demo's synthetic data (16x16, 10 classes), 4 virtual
# workers of 8, the demo's schedule. Long enough to leave chance level far behind, short enough
# for 2 x 3 seeds x 2 norms on one CPU thread in minutes.
RESULTS_RUN = {"model": "resnet8", "image_size": 16, "batch": 8, "workers": 4, "epochs": 4,
               "train_size": 4096, "test_size": 2000, "seeds": (0, 1, 2)}


def bf16_results(ctx: Context) -> Item:
    item = Item("bf16_results", 10, "bf16 autocast vs fp32: test error of a short real training "
                                    "run against the seed-to-seed spread")
    if DEFAULT.amp_dtype(ctx.device) != torch.bfloat16:
        item.skipped = ("not measured: precision=auto is fp32 on this machine (no bf16 units), "
                        "so the default path does not change results here")
        return item
    run = dict(RESULTS_RUN)
    if ctx.quick:
        run.update(epochs=1, train_size=512, test_size=256, seeds=(0, 1))
    for norm in ("bn", "gn"):
        errors: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for seed in run["seeds"]:
            for precision in errors:
                errors[precision].append(_trained_error(ctx, norm, precision, seed, run))
        differences = [b - f for b, f in zip(errors["bf16"], errors["fp32"])]
        mean_difference = statistics.mean(differences)
        spread = max(statistics.stdev(errors["fp32"]), statistics.stdev(errors["bf16"]))
        value = Ratio(mean_difference, min(differences), max(differences), len(differences))
        name = "gn8" if norm == "gn" else norm
        item.rows.append(Row(
            f"{run['model']} {run['image_size']}x{run['image_size']} synthetic, {name}, batch "
            f"{run['batch']} x {run['workers']}, {run['epochs']} epochs: test error bf16 - fp32 "
            f"(same seed; mean over {len(differences)} seeds) vs the seed sd {spread:.2f}",
            value, unit="points", target=f"|diff| <= seed sd {spread:.2f}",
            passed=abs(mean_difference) <= spread,
            details={"fp32_errors": [round(e, 2) for e in errors["fp32"]],
                     "bf16_errors": [round(e, 2) for e in errors["bf16"]],
                     "fp32_seed_sd": statistics.stdev(errors["fp32"]),
                     "bf16_seed_sd": statistics.stdev(errors["bf16"])}))
    item.notes.append("Each run: normbench's Trainer (train_epoch, then evaluate with running "
                      "statistics) on the demo's synthetic data set (shift 4, mix 0.5), lr 0.4 "
                      "per 256 images, decay at 50% and 80%; fp32 and bf16 runs of one seed start "
                      "from the same weights and see the same batches. The seed sd is the "
                      "sample standard deviation of the test error over seeds (the larger of "
                      "the two precisions'); a mean difference within it is within seed noise.")
    return item


def _trained_error(ctx: Context, norm: str, precision: str, seed: int, run: dict) -> float:
    variant = Variant(precision, precision=precision)
    trainer = trainer_for(ctx, batch=run["batch"], workers=run["workers"], norm=norm,
                          model=run["model"], image_size=run["image_size"], variant=variant,
                          train_size=run["train_size"], seed=seed, epochs=run["epochs"],
                          dataset={"test_size": run["test_size"], "shift": 4, "mix": 0.5},
                          optim={"lr_per_256": 0.4, "milestones": [0.5, 0.8]})
    for _ in range(run["epochs"]):
        trainer.train_epoch()
        trainer.epoch += 1
    return trainer.evaluate()["test_error"]
