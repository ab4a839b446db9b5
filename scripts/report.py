"""Write the report of an experiment: REPORT.md, runs.csv, summary.csv, curves.csv and figures.

The same as `normbench report` (normbench/commands/report.py), from a checkout:

    python scripts/report.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout, installed or not

from normbench.commands.report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
