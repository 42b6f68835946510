"""Timing scripts: ``python -m benchmarks.ops`` (``make run`` / ``make bench``)."""
