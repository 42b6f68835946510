"""A stack of residual blocks, scanned over depth so compile time stays flat in the layer count.

The per-layer mixer pattern (e.g. "gla,gla,gla,attention") is one scanned unit; its parameters,
constants and decoding states carry a leading "layers" axis of n_layers / len(pattern).
"""

from __future__ import annotations

import flax.linen as nn

from effseq import sharding
from effseq.models.backbone import Backbone
from effseq.models.blocks import ResidualBlock

# Stacks of at most this many scanned groups are unrolled (see Stack.setup).
UNROLL_UP_TO = 4
# The residual stream's sharding: batch over data and fsdp, time over sequence.
_STREAM = (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_EMBED)


class _Group(nn.Module):
    """One repeat of the mixer pattern."""

    backbone: Backbone

    def setup(self):
        self.blocks = [
            ResidualBlock(m, self.backbone, name=f"{i}_{m}")
            for i, m in enumerate(self.backbone.mixer)
        ]

    def __call__(self, x, mask, segment_ids, deterministic):
        for blk in self.blocks:
            x = sharding.constrain(blk(x, mask, deterministic, segment_ids), _STREAM)
        return x, None

    def step(self, x_t, states):
        new = []
        for blk, state in zip(self.blocks, states, strict=True):
            x_t, state = blk.step(x_t, state)
            new.append(state)
        return x_t, tuple(new)

    def init_state(self, carry, batch, max_len):
        return carry, tuple(blk.init_state(batch, max_len) for blk in self.blocks)

    def prefill(self, x, max_len, segment_ids):
        states = []
        for blk in self.blocks:
            x, state = blk.prefill(x, max_len, segment_ids)
            states.append(state)
        return x, tuple(states)


class Stack(nn.Module):
    """``backbone.n_layers`` residual blocks: x (b, t, d) -> (b, t, d)."""

    backbone: Backbone

    def setup(self):
        length = self.backbone.groups
        scan = dict(
            variable_axes={"params": 0, "constants": 0},
            split_rngs={"params": True, "constants": True, "dropout": True},
            length=length,
            # A few layers are unrolled: the loop's per-layer slicing and stacking of
            # parameters and gradients cost 20-25% of a 2-layer, width-64 train step on CPU.
            # Deeper stacks stay rolled, so compile time stays flat in the depth.
            unroll=length if length <= UNROLL_UP_TO else 1,
            metadata_params={nn.PARTITION_NAME: sharding.LAYERS},
        )
        # static_argnums counts self: (self, x, mask, segment_ids, deterministic).
        target = nn.remat(_Group, static_argnums=(4,)) if self.backbone.remat else _Group
        scanned = nn.scan(
            target,
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
            **scan,
            methods={
                "__call__": dict(in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), **scan),
                "step": dict(in_axes=0, **scan),
                "init_state": dict(in_axes=(nn.broadcast, nn.broadcast), **scan),
                "prefill": dict(in_axes=(nn.broadcast, nn.broadcast), **scan),
            },
        )
        self.groups = scanned(self.backbone, name="layers")

    def __call__(self, x, mask=None, deterministic: bool = True, segment_ids=None):
        """x (b, t, d); mask (b, t) bool or None; segment_ids (b, t) int or None (packed
        documents, :mod:`effseq.ops.segments`)."""
        x = sharding.constrain(x, _STREAM)
        return self.groups(x, mask, segment_ids, deterministic)[0]

    def init_state(self, batch: int, max_len: int):
        return self.groups.init_state(None, batch, max_len)[1]

    def step(self, x_t, states):
        return self.groups.step(x_t, states)

    def prefill(self, x, max_len: int, segment_ids=None):
        """A prompt x (b, t, d) in parallel -> (y, every layer's decoding state after it);
        with ``segment_ids``, the states of each row's last document."""
        return self.groups.prefill(x, max_len, segment_ids)
