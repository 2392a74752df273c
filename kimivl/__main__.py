"""``python -m kimivl``: the ``kimivl`` command (also under ``torchrun ... -m kimivl``)."""

import sys

from kimivl.cli import main

sys.exit(main())
