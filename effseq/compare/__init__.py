"""``effseq compare``: train every (task, mixer, seed) of a suite and report them side by side."""

from effseq.compare.run import SUITES, run_compare

__all__ = ["SUITES", "run_compare"]
