"""``effseq bench``: the model-level benchmarks of ``benchmarks/models.py``.

The benchmark scripts live in the repository's ``benchmarks/`` folder, beside the package and
not installed with it, so the command runs from a checkout (its root on ``sys.path``, as when
started there).
"""

from __future__ import annotations

import pathlib
import sys


def _add_checkout_to_path() -> None:
    """The checkout beside an editable install, or the working directory, on sys.path."""
    for root in (pathlib.Path(__file__).resolve().parents[1], pathlib.Path.cwd()):
        if (root / "benchmarks" / "models.py").is_file() and str(root) not in sys.path:
            sys.path.insert(0, str(root))
            return


def main(argv: list[str] | None = None) -> int:
    """Runs ``benchmarks.models.main(argv)``; SystemExit with the fix when it is not found."""
    _add_checkout_to_path()
    try:
        from benchmarks import models
    except ModuleNotFoundError as e:
        if e.name not in ("benchmarks", "benchmarks.models"):
            raise
        raise SystemExit(
            "effseq bench: the benchmarks/ folder is not importable; run the command from the "
            "root of an effseq checkout (python -m benchmarks.models works there too)"
        ) from None
    return models.main(argv)
