"""Pallas kernels behind the ops' ``impl="pallas"`` switch.

Each module here holds the kernels of one op family (``gla``, ``ssd``, ``delta``,
``selective``); the public ops in :mod:`effseq.ops` keep validation, packing, sequence sharding
and ``h0`` handling and call into these for the single-shard, unpacked case. The kernels are
written in Pallas's portable grid/BlockSpec form and lowered on NVIDIA GPUs through Pallas's
Triton backend (:mod:`effseq.ops.pallas._common` says why); on a CPU they run in Pallas's
interpret mode, so the same kernel source is what the tests check against the references.
The XLA paths stay the default on every backend.
"""
