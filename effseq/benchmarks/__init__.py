"""Benchmarks, importable with the package: models (``effseq bench``: :mod:`.models`, and
``effseq bench --plan small``: :mod:`.small`; ``make bench-models`` / ``make bench-small``) and
kernels (``python -m effseq.benchmarks.ops``; ``make bench-ops`` / ``make bench``). The committed
results live in the checkout's ``benchmarks/results/``."""
