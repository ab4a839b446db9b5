"""Unpack an image-folder archive (e.g. ../shared/data/cifar10-jpeg.tar.gz) for dataset=imagefolder.

The same as `normbench prepare-data` (normbench/commands/prepare_data.py), from a checkout:

    python scripts/prepare_data.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout, installed or not

from normbench.commands.prepare_data import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
