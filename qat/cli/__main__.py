"""``python -m qat.cli``: the ``qat`` command."""

import sys

from qat.cli import main

sys.exit(main())
