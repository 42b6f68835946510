"""effseq: a JAX/Flax research framework for efficient sequence models.

The kernels live in :mod:`effseq.ops` (pure JAX, no parameters). Layers, models and the
trainer build on them.
"""

__version__ = "0.1.0"
