"""``python -m fluxfill_engine.cli``, the form ``torchrun -m`` launches."""

import sys

from . import main

sys.exit(main())
