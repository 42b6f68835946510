"""Multi-head softmax attention layer, the baseline mixer.

Vaswani et al. 2017, "Attention Is All You Need" (sec. 3.2). Options: causal or bidirectional;
sliding-window (local) attention; rotary position embeddings (Su et al. 2021, "RoFormer",
eq. 34, rotating the two halves of each head); Primer's depthwise convolution after the q, k and
v projections (So et al. 2021, "Primer: Searching for Efficient Transformers for Language
Modeling", sec. 3, "Multi-DConv-Head Attention", width 3). Primer's squared-ReLU MLP belongs to
the residual block, not here.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from effseq import ops, sharding
from effseq.layers import params
from effseq.layers.masking import packing, zero_padding
from effseq.layers.mixer import Mixer
from effseq.ops import segments


def rotary(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotates x (b, t, h, k) by position: pairs (x_i, x_{i + k/2}) turn by pos * base^(-2i/k)."""
    half = x.shape[-1] // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions.astype(jnp.float32)[..., None] * freq  # (b | 1, t, k/2)
    cos, sin = jnp.cos(angle)[:, :, None, :], jnp.sin(angle)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Attention(Mixer):
    """Multi-head attention mixer: x (b, t, d) -> (b, t, d).

    Attributes:
      d_model: width d.
      num_heads: heads h; head_dim k defaults to d / h.
      causal: attend to the past only (required for decoding).
      window: sliding-window size (None: full attention).
      rotary: rotary position embeddings on q and k.
      dconv: Primer's causal depthwise convolution (width ``dconv_width``) after the q, k, v
        projections; causal models only.
      impl: ``effseq.ops.attention`` implementation (None: the backend default).
    """

    num_heads: int = 4
    head_dim: int | None = None
    window: int | None = None
    rotary: bool = False
    rotary_base: float = 10000.0
    dconv: bool = False
    dconv_width: int = 3
    impl: str | None = None

    def _dims(self):
        head_dim = self.head_dim or self.d_model // self.num_heads
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(
                f"Attention: d_model={self.d_model} is not divisible by num_heads="
                f"{self.num_heads}; set head_dim"
            )
        if self.rotary and head_dim % 2:
            raise ValueError(f"Attention: rotary needs an even head_dim, got {head_dim}")
        if self.dconv and not self.causal:
            raise ValueError("Attention: dconv (Primer) is a causal convolution; set causal=True")
        return self.num_heads, head_dim

    def setup(self):
        self.w = self._create_params()

    def _create_params(self):
        h, k = self._dims()
        qkv_axes = (sharding.EMBED, sharding.HEADS, sharding.HEAD_DIM)
        init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=0, out_axis=(1, 2))
        w = {
            name: params.param(self, name, init, (self.d_model, h, k), qkv_axes, self.param_dtype)
            for name in ("query", "key", "value")
        }
        out_init = nn.initializers.variance_scaling(
            1.0, "fan_in", "normal", in_axis=(0, 1), out_axis=2
        )
        w["out"] = params.param(
            self,
            "out",
            out_init,
            (h, k, self.d_model),
            (sharding.HEADS, sharding.HEAD_DIM, sharding.EMBED),
            self.param_dtype,
        )
        if self.dconv:
            # Start as the identity (tap 0 = 1) so the convolution is a learned refinement.
            def dconv_init(key, shape, dtype):
                return jnp.zeros(shape, dtype).at[..., 0].set(1.0)

            for name in ("query", "key", "value"):
                w[f"dconv_{name}"] = params.param(
                    self,
                    f"dconv_{name}",
                    dconv_init,
                    (h, k, self.dconv_width),
                    (sharding.HEADS, sharding.HEAD_DIM, sharding.CONV),
                    self.param_dtype,
                )
        return w

    def _project(self, w, x):
        """x (b, t, d) -> q, k, v, each (b, t, h, k), before the convolution."""
        x = x.astype(self.dtype)
        return [ops.dense(x, w[n].astype(self.dtype)) for n in ("query", "key", "value")]

    def _qkv(self, x: jax.Array, segment_ids: jax.Array | None = None):
        """x (b, t, d) -> (q, k, v) as attention reads them, and the pre-convolution ones.
        With ``segment_ids`` (the ops' ids), the convolution's taps stop at document starts
        and rotary positions restart at each."""
        w = self.w
        raw = self._project(w, x)
        q, k, v = raw
        if self.dconv:
            q, k, v = (
                self._dconv_parallel(w[f"dconv_{n}"], y, segment_ids)
                for n, y in zip(("query", "key", "value"), raw, strict=True)
            )
        if self.rotary:
            if segment_ids is None:
                pos = jnp.arange(x.shape[1])[None]
            else:
                pos = segments.positions(segment_ids)
            q, k = rotary(q, pos, self.rotary_base), rotary(k, pos, self.rotary_base)
        return (q, k, v), raw

    def _attend(self, q, k, v, mask=None, segment_ids=None):
        if segment_ids is None:
            o = ops.attention(
                q, k, v, causal=self.causal, window=self.window, kv_mask=mask, impl=self.impl
            )
        else:
            o = ops.attention(
                q,
                k,
                v,
                causal=self.causal,
                window=self.window,
                kv_mask=mask,
                impl=self.impl,
                segment_ids=segment_ids,
            )
        return ops.dense(o, self.w["out"].astype(self.dtype), 2)

    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None, *, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """x (b, t, d), mask (b, t) bool or None, segment_ids (b, t) int or None -> (b, t, d);
        no query attends to padding (mask False or id 0) or to another document."""
        mask, seg = packing("Attention", x, mask, segment_ids)
        return self._attend(*self._qkv(zero_padding(x, mask), seg)[0], mask, seg)

    def prefill(
        self, x: jax.Array, max_len: int, *, segment_ids: jax.Array | None = None
    ) -> tuple[jax.Array, dict]:
        """A prompt x (b, t, d), t <= max_len, in parallel -> (y, the KV cache holding it).

        With ``segment_ids`` (packed documents, 0 = padding) y is ``__call__``'s, and the cache
        holds each row's last document alone: its keys (rotated by their positions in the
        document) and values at cache positions [0, n), n its length, and ``index`` (b,) = n,
        one per row; ``step`` then continues that document as if it had been the whole prompt.
        """
        self.check_causal("prefill")
        b, t, _ = x.shape
        if t > max_len:
            raise ValueError(f"Attention.prefill: prompt length {t} exceeds max_len={max_len}")
        if segment_ids is not None:
            return self._prefill_packed(x, max_len, segment_ids)
        (q, k, v), raw = self._qkv(x)
        state = self.init_state(b, max_len)
        state["key"] = state["key"].at[:, :t].set(k.astype(self.dtype))
        state["value"] = state["value"].at[:, :t].set(v.astype(self.dtype))
        state["index"] = jnp.asarray(t, jnp.int32)
        if self.dconv:
            w = self.dconv_width - 1
            channels = jnp.concatenate([y.reshape(b, t, -1) for y in raw], -1)  # (b, t, 3hk)
            # Prompts shorter than the window leave zeros in front, as init_state does.
            padded = jnp.pad(channels.astype(jnp.float32), ((0, 0), (w, 0), (0, 0)))
            state["window"] = padded[:, padded.shape[1] - w :]
        return self._attend(q, k, v), state

    def _prefill_packed(self, x, max_len, segment_ids):
        b, t, _ = x.shape
        mask, seg = packing("Attention.prefill", x, None, segment_ids)
        (q, k, v), raw = self._qkv(zero_padding(x, mask), seg)
        # The last document: from its first position to the last real token (n = 0: no token).
        idx = jnp.arange(t, dtype=jnp.int32)
        last = jnp.max(jnp.where(mask, idx, -1), axis=1)  # (b,)
        pos = segments.positions(seg)
        n = jnp.where(
            last >= 0, jnp.take_along_axis(pos, jnp.maximum(last, 0)[:, None], 1)[:, 0] + 1, 0
        )
        slots = jnp.arange(max_len, dtype=jnp.int32)
        src = jnp.clip(last[:, None] - n[:, None] + 1 + slots[None], 0, t - 1)  # (b, max_len)
        keep = (slots[None] < n[:, None])[:, :, None, None]

        def cache(y):
            y = jnp.take_along_axis(y, src[:, :, None, None], axis=1)
            return jnp.where(keep, y, 0).astype(self.dtype)

        state = self.init_state(b, max_len)
        state["key"], state["value"] = cache(k), cache(v)
        state["index"] = n.astype(jnp.int32)
        if self.dconv:
            channels = jnp.concatenate([y.reshape(b, t, -1) for y in raw], -1)  # (b, t, 3hk)
            state["window"] = segments.last_window(channels, self.dconv_width - 1, segment_ids)
        return self._attend(q, k, v, mask, seg), state

    def _dconv_parallel(self, kern, y, segment_ids=None):
        b, t, h, k = y.shape
        u, kern = y.reshape(b, t, h * k), kern.reshape(h * k, -1)
        if segment_ids is None:
            flat = ops.causal_conv(u, kern, impl="direct")
        else:
            flat = ops.causal_conv(u, kern, impl="direct", segment_ids=segment_ids)
        return flat.reshape(b, t, h, k).astype(self.dtype)

    def init_state(self, batch: int, max_len: int) -> dict:
        """KV cache (b, max_len, h, k) x 2, the next position (a scalar), and Primer's input
        window: the last dconv_width - 1 projections q, k, v (b, dconv_width - 1, 3 h k)
        float32."""
        h, k = self._dims()
        state = {
            "key": jnp.zeros((batch, max_len, h, k), self.dtype),
            "value": jnp.zeros((batch, max_len, h, k), self.dtype),
            "index": jnp.zeros((), jnp.int32),
        }
        if self.dconv:
            state["window"] = jnp.zeros((batch, self.dconv_width - 1, 3 * h * k), jnp.float32)
        return state

    def step(self, x_t: jax.Array, state: dict) -> tuple[jax.Array, dict]:
        """One token x_t (b, d) -> (y_t (b, d), state); cost grows with the cache length.

        ``state["index"]`` is the next position: a scalar shared by the rows, or (b,), one per
        row, after a packed prefill (:meth:`prefill` with ``segment_ids``)."""
        self.check_causal("step")
        w = self.w
        index = state["index"]
        q, k, v = (y[:, 0] for y in self._project(w, x_t[:, None]))  # (b, h, k) each
        new = dict(state)
        if self.dconv:
            b, h, k_dim = q.shape
            channels = jnp.stack([q, k, v], 1).reshape(b, 3 * h * k_dim)  # as in prefill
            kern = jnp.stack([w[f"dconv_{n}"] for n in ("query", "key", "value")])  # (3,h,k,l)
            y, new["window"] = ops.causal_conv_step(
                state["window"], channels, kern.reshape(3 * h * k_dim, -1).astype(self.dtype)
            )
            q, k, v = (y.reshape(b, 3, h, k_dim)[:, i] for i in range(3))
        q, k = q[:, None], k[:, None]
        if index.ndim == 1:  # one position per row, after a packed prefill
            return self._step_rows(q, k, v, new)
        if self.rotary:
            pos = jnp.full((1, 1), index)
            q, k = rotary(q, pos, self.rotary_base), rotary(k, pos, self.rotary_base)
        new["key"] = jax.lax.dynamic_update_slice_in_dim(
            state["key"], k.astype(self.dtype), index, 1
        )
        new["value"] = jax.lax.dynamic_update_slice_in_dim(
            state["value"], v[:, None].astype(self.dtype), index, 1
        )
        o = ops.attention(
            q,
            new["key"],
            new["value"],
            causal=True,
            window=self.window,
            q_offset=index,
            impl=self.impl,
        )
        new["index"] = index + 1
        y = jnp.einsum("bhk,hkd->bd", o[:, 0], w["out"].astype(self.dtype))
        return y, new

    def _step_rows(self, q, k, v, new):
        """``step`` with ``index`` (b,), each row's own next position (a packed prefill's
        cache): q, k (b, 1, h, k), v (b, h, v). The rows' causal (and sliding-window) masks
        become a key mask."""
        index = new["index"]
        if self.rotary:
            pos = index[:, None]
            q, k = rotary(q, pos, self.rotary_base), rotary(k, pos, self.rotary_base)
        rows = jnp.arange(q.shape[0])
        new["key"] = new["key"].at[rows, index].set(k[:, 0].astype(self.dtype))
        new["value"] = new["value"].at[rows, index].set(v.astype(self.dtype))
        slots = jnp.arange(new["key"].shape[1])[None]
        visible = slots <= index[:, None]
        if self.window is not None:
            visible &= slots > index[:, None] - self.window
        o = ops.attention(
            q, new["key"], new["value"], causal=False, kv_mask=visible, impl=self.impl
        )
        new["index"] = index + 1
        y = jnp.einsum("bhk,hkd->bd", o[:, 0], self.w["out"].astype(self.dtype))
        return y, new
