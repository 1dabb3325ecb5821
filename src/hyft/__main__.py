"""``python -m hyft``, also what ``torchrun --nproc-per-node N -m hyft train ...`` starts on every rank."""

import sys

from hyft.cli import main

sys.exit(main())
