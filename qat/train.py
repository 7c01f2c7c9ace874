"""The ``accelerate launch`` entry point: ``accelerate launch qat/train.py RECIPE.yaml [--key v]``.

Thin on purpose: the command is ``qat.cli.train``, the loop ``qat.training.run``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script: Python put qat/ itself first on sys.path; use the repo root instead
    # so `import qat` finds the package and no folder here shadows a library.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from qat.cli import quiet_broken_pipe  # noqa: E402
from qat.cli.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(quiet_broken_pipe(main))
