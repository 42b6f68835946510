"""Logical axis names: layers name their parameters' and activations' axes with these.

Layers never build a ``PartitionSpec``. They label each parameter dimension with one of the
names below (``nn.with_logical_partitioning``); a rules table maps names to mesh axes.
Parameter axes and activation axes are kept apart so the two can be sharded differently.
"""

# Parameter axes.
EMBED = "embed"  # model width d
MLP = "mlp"  # hidden width of an MLP / GLU
VOCAB = "vocab"  # token vocabulary
HEADS = "heads"  # attention / GLA heads
HEAD_DIM = "head_dim"  # per-head key or value width
INNER = "inner"  # Mamba's expanded width (expand * d)
STATE = "state"  # SSM state size n
LOW_RANK = "low_rank"  # low-rank projections (Mamba's dt, GLA's gate)
CONV = "conv"  # taps of a short convolution
SCALES = "scales"  # SGConv sub-kernel scales
KERNEL = "kernel"  # SGConv sub-kernel taps
LAYERS = "layers"  # the stacked-layers axis of a scanned stack
COMPLEX = "complex"  # the (real, imaginary) pair of a complex parameter stored as reals
CLASSES = "classes"  # classifier outputs

# Activation axes.
ACT_BATCH = "activation_batch"
ACT_LENGTH = "activation_length"
ACT_EMBED = "activation_embed"

PARAM_AXES = (
    EMBED,
    MLP,
    VOCAB,
    HEADS,
    HEAD_DIM,
    INNER,
    STATE,
    LOW_RANK,
    CONV,
    SCALES,
    KERNEL,
    LAYERS,
    COMPLEX,
    CLASSES,
)
