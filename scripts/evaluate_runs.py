"""Evaluate the last checkpoint of every run of an experiment again, with today's evaluation code.

The same as `normbench evaluate` (normbench/commands/evaluate_runs.py), from a checkout:

    python scripts/evaluate_runs.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout, installed or not

from normbench.commands.evaluate_runs import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
