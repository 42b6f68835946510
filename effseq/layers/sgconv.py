"""SGConv: a structured global convolution sequence mixer.

Li, Cai, Zhang, Chen & Dey 2022, "What Makes Convolutional Models Great on Long Sequence
Modeling?", sec. 3.1: each channel's kernel is assembled from s short sub-kernels of
``kernel_dim`` parameters, sub-kernel i stretched by 2**max(0, i - 1) and damped by decay**(-i)
(:func:`effseq.ops.sgconv_kernel`), then divided by a per-channel norm Z fixed at
initialization.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from effseq import ops, sharding
from effseq.layers import params
from effseq.layers.conv_output import conv_output, output_params
from effseq.layers.masking import packing, zero_padding
from effseq.layers.mixer import Mixer
from effseq.ops import segments
from effseq.typing import Array


def num_scales(max_len: int, kernel_dim: int) -> int:
    """The smallest s with ops.sgconv_length(s, kernel_dim) >= max_len (sec. 3.1)."""
    s = 1
    while ops.sgconv_length(s, kernel_dim) < max_len:
        s += 1
    return s


class SGConv(Mixer):
    """SGConv mixer: y = Proj(GELU(K * x + D x)), K = sgconv_kernel(sub_kernels) / Z.

    Follows the mixer interface (:class:`effseq.layers.Mixer`). Shapes: x (b, t, d); the kernel has
    h = d channels; sub_kernels (s, h, kernel_dim).

    The decay convention: the paper (sec. 3.1) weights scale i by alpha**i with a decay
    coefficient alpha < 1 (1/2 by default); the op weights it by decay**(-i), so
    decay = 1 / alpha = 2. A factor common to all scales (the released code scales by
    decay**(s - 1 - i) instead) changes nothing: the normalization Z cancels it.

    Kernel normalization: Z (h,) is the L2 norm of each channel's assembled kernel (over its
    natural length ``sgconv_length(s, kernel_dim)``) at initialization, then held fixed, as
    in the released code. It is computed inside the initializer of a variable in the
    ``"constants"`` collection, so it is a pure function of the initial sub-kernels: ``init``
    returns it, ``apply`` reads it and never writes it, and nothing depends on which call came
    first. A separate collection rather than a stop-gradient parameter because an optimizer
    sees every parameter: decoupled weight decay would shrink a "frozen" Z even with a zero
    gradient, and optimizer state would be kept for it. Pass the whole ``variables`` dict (or
    at least ``params`` and ``constants``) to ``apply``.

    Attributes:
      d_model: width d (= kernel channels h).
      max_len: the sequence length the kernel must cover; sets the number of scales
        (:func:`num_scales`); the default suits short tasks, models should pass their
        sequence length. Inputs up to the natural length ``sgconv_length(s, kernel_dim)``
        (>= max_len) see the whole kernel; longer ones see it zero-padded.
      kernel_dim: parameters per sub-kernel (paper default 64).
      decay: per-scale damping, scale i weighted decay**(-i).
      glu: output projection Dense d -> 2d then GLU (the released code's default); else
        Dense d -> d.
      causal: False adds a second, independent kernel over the future
        (:func:`effseq.ops.bidirectional_conv`); ``step`` and ``prefill`` then raise.
      conv_impl: ``impl`` of the convolution op (None: the backend's default). ``"direct"`` is
        exactly causal; ``"fft"`` is causal up to float32 roundoff.
      dtype: compute dtype; the kernel is assembled in float32.
      param_dtype: parameter storage dtype.

    Parameters: ``sub_kernels`` (and ``sub_kernels_bwd``) (s, h, kernel_dim), standard normal
    (released code), SSM-tagged; D (h,) skip, standard normal, SSM-tagged;
    ``out_kernel``/``out_bias``: the output projection. Constants: ``kernel_norm`` (and
    ``kernel_norm_bwd``) (h,).
    """

    kernel_dim: int = 64
    decay: float = 2.0
    glu: bool = True
    conv_impl: str | None = None

    @property
    def num_scales(self) -> int:
        return num_scales(self.max_len, self.kernel_dim)

    def _sub_kernels(self, suffix: str) -> tuple[Array, nn.Variable]:
        s = self.num_scales
        w = params.param(
            self,
            "sub_kernels" + suffix,
            nn.initializers.normal(1.0),
            (s, self.d_model, self.kernel_dim),
            (sharding.SCALES, sharding.EMBED, sharding.KERNEL),
            self.param_dtype,
            # The SGConv code's kernels set only a learning rate (_optim = {"lr": 0.001}), so
            # they keep the main weight decay.
            group="ssm_decay",
        )

        def init_norm():
            # Runs only when the variable is created (in ``init``), on the initial sub-kernels.
            k = ops.sgconv_kernel(w, ops.sgconv_length(s, self.kernel_dim), self.decay)
            return nn.LogicallyPartitioned(jnp.linalg.norm(k, axis=-1), (sharding.EMBED,))

        norm = self.variable("constants", "kernel_norm" + suffix, init_norm)
        return w, norm

    def setup(self):
        self.sub_kernels, self.kernel_norm = self._sub_kernels("")
        if not self.causal:
            self.sub_kernels_bwd, self.kernel_norm_bwd = self._sub_kernels("_bwd")
        self.D, self.out_kernel, self.out_bias = output_params(self, self.d_model, self.glu)

    def _kernel(self, w: Array, norm: nn.Variable, length: int) -> Array:
        """K (h, length) float32."""
        k = ops.sgconv_kernel(w, length, self.decay)
        return k / norm.value.astype(jnp.float32)[:, None]

    def _output(self, y: Array, x: Array) -> Array:
        return conv_output(y, x, self.D, self.out_kernel, self.out_bias, self.glu, self.dtype)

    def __call__(
        self, x: Array, mask: Array | None = None, *, segment_ids: Array | None = None
    ) -> Array:
        """x (b, t, d), mask (b, t) bool or None -> y (b, t, d) in ``dtype``. Zeroed padding
        adds nothing to a convolution, in either direction. With ``segment_ids`` (packed
        documents, 0 = padding) the convolution's taps stop at document boundaries (the
        convolution ops' masked direct form)."""
        mask, seg = packing("SGConv", x, mask, segment_ids)
        x = zero_padding(x.astype(self.dtype), mask)
        t = x.shape[1]
        k = self._kernel(self.sub_kernels, self.kernel_norm, t)
        packed = {} if seg is None else {"segment_ids": seg}
        if not self.causal:
            k_bwd = self._kernel(self.sub_kernels_bwd, self.kernel_norm_bwd, t)
            y = ops.bidirectional_conv(x, k, k_bwd, impl=self.conv_impl, **packed)
        else:
            y = ops.causal_conv(x, k, impl=self.conv_impl, **packed)
        return self._output(y, x)

    def init_state(self, batch: int, max_len: int) -> Array:
        """The last ``max_len - 1`` inputs (b, max_len - 1, d) float32, zeros before the start.

        A global convolution has no finite state: decoding keeps the inputs its kernel of
        ``max_len`` taps reaches, and steps it as a (long) :func:`effseq.ops.causal_conv_step`.
        """
        return jnp.zeros((batch, max_len - 1, self.d_model), jnp.float32)

    def prefill(
        self, x: Array, max_len: int, *, segment_ids: Array | None = None
    ) -> tuple[Array, Array]:
        """A prompt x (b, t, d), t <= max_len, in parallel -> (y, the window holding it); with
        ``segment_ids`` (0 = padding), the window holds each row's last document only, zeros
        before its start (:func:`effseq.ops.segments.last_window`)."""
        self.check_causal("prefill")
        t = x.shape[1]
        if t > max_len:
            raise ValueError(f"SGConv.prefill: prompt length {t} exceeds max_len={max_len}")
        w = max_len - 1
        if segment_ids is not None:
            y = self(x, segment_ids=segment_ids)
            return y, segments.last_window(x.astype(self.dtype), w, segment_ids)
        # Prompts shorter than the window leave zeros in front, as init_state does.
        padded = jnp.pad(x.astype(self.dtype).astype(jnp.float32), ((0, 0), (w, 0), (0, 0)))
        return self(x), padded[:, padded.shape[1] - w :]

    def step(self, x_t: Array, window: Array) -> tuple[Array, Array]:
        """One token: x_t (b, d) -> y_t (b, d); y_t = sum_{s < max_len} K[:, s] x[pos - s].

        O(max_len d) per token; tokens further back than the window (max_len - 1) fall out of
        it, as they fall outside the kernel's length.
        """
        self.check_causal("step")
        x_t = x_t.astype(self.dtype)
        k = self._kernel(self.sub_kernels, self.kernel_norm, window.shape[1] + 1)  # (h, l)
        y, window = ops.causal_conv_step(window, x_t, k)
        return self._output(y, x_t), window
