"""``python -m fluxfill_engine``: the ``fluxfill`` command."""

import sys

from .cli import main

sys.exit(main())
