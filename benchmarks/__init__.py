"""Benchmarks: kernels (``python -m benchmarks.ops``, ``make bench`` / ``make bench-ops``) and
models (``effseq bench``, ``make bench-models`` / ``make bench-small``)."""
