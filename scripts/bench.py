"""The performance benchmark: where a training step's time goes, as ratios measured side by side.

    python scripts/bench.py [--device cpu|cuda] [--quick] [--items 1,2,3] --out results/bench

Prints a table and writes OUT/bench.json and OUT/bench.md with the command, hardware (CPU model
and whether it has bf16 units), versions and per-item targets with pass/fail. The items
(scripts/benchkit/ describes each):

  1 framework overhead: normbench's training step / a hand-written loop      target <= 1.05
  2 per-worker BN: a workers=8 batch=2 step, each implementation / plain BN  target <= 1.15
  3 an epoch of 8 virtual workers x 2 images vs 8x more steps of 2 images     target >= 3x (CPU)
  4 every norm's step time relative to bn, at batch 32 and 2
  5 input pipeline images/s / training images/s                               target >= 3
  6 ResNet-50 images/s, bn and gn, eager and compiled (CUDA only)    gn >= 0.8x bn; bn bf16
                                                                     at 224 >= 3000/s (H100)
  7 torch.compile against the eager step (CUDA, or --compile)
  8 the default path / today's (fp32, NCHW, hand-written BN)  target >= 1.5 (bf16 CPU)
  9 channels_last / NCHW per model, norm, precision, batch (channels_last=auto's rule)
 10 bf16 vs fp32 test error of a short training run, against the seed spread

On a CPU the CIFAR ResNet-20 at 32x32 is used (item 6 is skipped, and says so). --quick is a
smoke test (ResNet-8 at 16x16, fewer repetitions): its numbers are not the benchmark's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package
# benchkit lies beside this file: on sys.path when run as a script, not when `normbench bench`
# loads this file by its path.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import benchkit  # noqa: E402  (scripts/benchkit/, beside this file)
from normbench.config import RunConfig, parse_config  # noqa: E402
from benchkit import measure  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when present (default)")
    parser.add_argument("--quick", action="store_true", help="smoke mode (seconds, not figures)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench",
                        help="folder for bench.json and bench.md (default results/bench)")
    parser.add_argument("--items", default=",".join(str(i) for i in benchkit.ITEMS),
                        help="comma-separated item numbers (default: all)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="repetitions per comparison (default 7; 3 with --quick)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile on the CPU in item 7 (always on CUDA)")
    parser.add_argument("--num-workers", type=int, default=2,
                        help="DataLoader processes for the image-folder pipeline (item 5)")
    parser.add_argument("--model", default=None,
                        help="conf/model/ choice for items 1-5 and 7, e.g. resnet20_w2 (default "
                             "resnet20; resnet8 with --quick)")
    parser.add_argument("--gpu-sizes", default="32,224",
                        help="item 6: input sizes (32: cifar stem, 224: imagenet stem)")
    parser.add_argument("--variant", choices=("default", "today"), default="default",
                        help="how items 1-7 run their steps: the default path, or today's "
                             "(fp32, NCHW, hand-written per-worker BN); items 8-10 compare both")
    parser.add_argument("--gpu-modes", default="eager,compiled",
                        help="item 6: eager and/or compiled (compiling ResNet-50 takes minutes)")
    args = parser.parse_args(argv)
    args.gpu_sizes = [int(v) for v in args.gpu_sizes.split(",")]
    args.gpu_modes = args.gpu_modes.split(",")
    if not set(args.gpu_modes) <= {"eager", "compiled"}:
        parser.error(f"--gpu-modes {args.gpu_modes}: choose from eager, compiled")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    try:
        args.items = sorted({int(i) for i in args.items.split(",") if i.strip()})
    except ValueError:
        parser.error(f"--items {args.items!r}: give item numbers, e.g. 1,2,3")
    unknown = [i for i in args.items if i not in benchkit.ITEMS]
    if unknown:
        parser.error(f"--items: unknown item(s) {unknown}; known: {list(benchkit.ITEMS)}")
    return args


def base_config(device: torch.device, model: str) -> RunConfig:
    """The run config `python run.py model=MODEL` composes (conf/config.yaml)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"model={model}", "dataset=synthetic", f"device={device.type}",
            "wandb.mode=disabled", "progress=false"])
    return parse_config(OmegaConf.to_container(cfg, resolve=True))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available()
                                                      else "cpu")
    device = torch.device(name)
    model = args.model or ("resnet8" if args.quick else "resnet20")
    ctx = measure.Context(
        device=device, base_config=base_config(device, model), quick=args.quick,
        repeats=args.repeats or (3 if args.quick else 7), model=model,
        image_size=16 if args.quick else 32, compile=args.compile,
        num_workers=args.num_workers, gpu_sizes=args.gpu_sizes, gpu_modes=args.gpu_modes,
        variant=measure.TODAY if args.variant == "today" else measure.DEFAULT)
    command = "python " + " ".join(shlex.quote(a) for a in
                                   [str(Path(sys.argv[0]).resolve().relative_to(ROOT))
                                    if Path(sys.argv[0]).resolve().is_relative_to(ROOT)
                                    else sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    report = {
        "command": command, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device.type, "quick": args.quick, "repeats": ctx.repeats, "model": ctx.model,
        "variant": {"name": ctx.variant.name, "bn": ctx.variant.describe("bn", device),
                    "gn": ctx.variant.describe("gn", device)},
        "hardware": measure.hardware(device), "versions": measure.versions(),
        "load_before": measure.load_average(), "items": {},
    }
    print(f"normbench benchmark on {device.type}: {report['hardware']['cpu']}, "
          f"{report['hardware']['torch_threads']} torch threads, GPU "
          f"{(report['hardware']['gpu'] or {}).get('name', 'none')}; load {report['load_before']}",
          flush=True)
    start = time.perf_counter()
    for number in args.items:
        item_start = time.perf_counter()
        item = benchkit.ITEMS[number](ctx)
        item.seconds = time.perf_counter() - item_start
        report["items"][item.key] = item.as_dict()
        if item.skipped:
            print(f"[{number}] {item.title}: SKIPPED, {item.skipped}", flush=True)
        else:
            for row in item.rows:
                ratio = f"{row.ratio.median:.3g}" if row.ratio else ""
                verdict = {True: " pass", False: " FAIL", None: ""}[row.passed]
                print(f"[{number}] {row.what}: ratio {ratio}"
                      f"{f' (target {row.target})' if row.target else ''}{verdict}", flush=True)
    report["seconds"] = time.perf_counter() - start
    report["load_after"] = measure.load_average()
    print()
    print(measure.render_table(report))
    if device.type != "cuda":
        print(f"\n{measure.NO_GPU_LINE}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "bench.md").write_text(measure.render_markdown(report))
    print(f"\nwrote {args.out / 'bench.md'} and {args.out / 'bench.json'} "
          f"({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
