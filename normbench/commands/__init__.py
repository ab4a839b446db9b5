"""The subcommands of the `normbench` command (normbench/cli.py) other than `train`, one module
each with ``main(argv, prog) -> exit status``. scripts/ holds thin wrappers over the same
functions for a checkout (`python scripts/report.py ...`)."""
