"""The `normbench` command (also `python -m normbench`): one subcommand per thing people do.

    normbench train norm=gn batch=2                 # one run: any Hydra override
    normbench train -m experiment=demo              # a sweep (experiments/demo.yaml)
    normbench train --config-dir ~/my_conf experiment=mine   # your own configs beside ours
    normbench plan experiment=cifar10               # which cells a relaunch skips, resumes, trains
    normbench report runs/demo --out results/demo   # REPORT.md, tables and figures
    normbench evaluate runs/demo --out results/demo/reevaluated.csv
    normbench prepare-data ARCHIVE                  # unpack an image-folder archive
    normbench bench --quick                         # the benchmark (from a checkout)

`normbench SUBCOMMAND --help` says more. The subcommands run the same code as run.py and the
scripts in scripts/ of a checkout.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Callable, NamedTuple

from normbench import __version__
from normbench.config_files import checkout_dir


class Subcommand(NamedTuple):
    run: Callable[[list[str], str], int]  # (arguments after the subcommand, prog) -> exit status
    summary: str


def train(args: list[str], prog: str) -> int:
    """Hydra's command line: overrides, -m, --config-dir, --cfg job, --help (Hydra reads
    sys.argv; its program name is what its usage lines and command.txt show)."""
    from normbench import hydra_main

    sys.argv = [prog, *args]
    hydra_main.main()
    return 0


def _command_module(module: str) -> Callable[[list[str], str], int]:
    def run(args: list[str], prog: str) -> int:
        return importlib.import_module(module).main(args, prog)
    return run


def bench(args: list[str], prog: str) -> int:
    """The checkout's benchmark (scripts/bench.py). It is not shipped in the package: it measures
    the library's code paths against each other on this machine and writes results/bench of the
    repository, a developer's tool rather than part of what `pip install` gives."""
    checkout = checkout_dir()
    script = None if checkout is None else checkout / "scripts" / "bench.py"
    if script is None or not script.is_file():
        print(f"{prog}: the benchmark runs from a checkout of normbench (scripts/bench.py, "
              "`make bench`); this normbench is an installed package without one", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("normbench_bench_script", script)
    module = importlib.util.module_from_spec(spec)
    saved_argv, sys.argv = sys.argv, [prog, *args]  # the benchmark records its command line
    try:
        spec.loader.exec_module(module)
        return module.main(args)
    finally:
        sys.argv = saved_argv


SUBCOMMANDS = {
    "train": Subcommand(train, "train one model, or a sweep with -m (Hydra overrides)"),
    "report": Subcommand(_command_module("normbench.commands.report"),
                         "write an experiment's report: REPORT.md, CSV tables, figures"),
    "plan": Subcommand(_command_module("normbench.commands.plan"),
                       "what `train -m` would do with each cell (skip, resume, train), doing none"),
    "evaluate": Subcommand(_command_module("normbench.commands.evaluate_runs"),
                           "evaluate every run's last checkpoint again with today's code"),
    "prepare-data": Subcommand(_command_module("normbench.commands.prepare_data"),
                               "unpack an image-folder archive for dataset=imagefolder"),
    "bench": Subcommand(bench, "the performance benchmark (needs a checkout)"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {sub.summary}" for name, sub in SUBCOMMANDS.items()]
    return ("usage: normbench SUBCOMMAND [ARGS...]   (normbench SUBCOMMAND --help)\n\n"
            "subcommands:\n" + "\n".join(lines) + "\n\n" + __doc__.split("\n\n")[1] + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"normbench {__version__}")
        return 0
    name, args = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"normbench: unknown subcommand {name!r}; choose one of "
              f"{', '.join(SUBCOMMANDS)} (normbench --help)", file=sys.stderr)
        return 2
    return SUBCOMMANDS[name].run(args, f"normbench {name}")
