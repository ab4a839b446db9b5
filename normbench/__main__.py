"""`python -m normbench ...`: the same as the `normbench` command (normbench/cli.py)."""

import sys

from normbench.cli import main

if __name__ == "__main__":
    sys.exit(main())
