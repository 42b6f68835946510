"""S4D: a diagonal state space sequence mixer.

Gu, Gupta, Goel & Re 2022, "On the Parameterization and Initialization of Diagonal State Space
Models" (S4D). Each of the h = d channels is an independent diagonal SSM of n complex modes
(standing for 2n real states in conjugate pairs); the parallel form convolves the input with the
SSM kernel (paper eq. 5), the recurrent form runs the discretized recurrence (eq. 3).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from effseq import ops, sharding
from effseq.layers import params
from effseq.layers.conv_output import conv_output, output_params
from effseq.layers.masking import packing, zero_padding
from effseq.layers.mixer import Mixer
from effseq.ops import segments
from effseq.typing import Array, DType

INITS = ("legs", "inv", "lin")


def legs_imag(n: int) -> np.ndarray:
    """Imaginary parts of S4D-LegS: the n positive eigenvalues of the skew part of HiPPO-LegS.

    HiPPO-LegS of size N = 2n is A = -(1/2) I + S - P P^T with P_i = sqrt(i + 1/2) (S4D paper
    sec. 4, and the normal-plus-low-rank form of HiPPO-LegS in "Efficiently Modeling Long
    Sequences with Structured State Spaces" (S4), sec. 3.3): the normal part -(1/2) I + S has
    the skew-symmetric S_ij = -(1/2) sqrt((2i + 1)(2j + 1)) sign(i - j). Its eigenvalues are
    -1/2 + i w for the eigenvalues i w of S, which come in conjugate pairs; S4D-LegS keeps the
    n with w > 0.

    Returns:
      (n,) float64, ascending.
    """
    N = 2 * n
    idx = np.arange(N)
    r = np.sqrt(2 * idx + 1)
    S = -0.5 * np.outer(r, r) * np.sign(idx[:, None] - idx[None, :])
    # -i S is Hermitian, so eigvalsh gives the w exactly real and sorted.
    w = np.linalg.eigvalsh(-1j * S)
    return w[n:]


def init_imag(init: str, n: int) -> np.ndarray:
    """Imaginary parts of A for an S4D initialization (S4D paper sec. 4), (n,) float64.

    With N = 2n real states (n complex modes, the convention of the S4 code):
    ``"legs"``: see :func:`legs_imag`;
    ``"inv"``: (N / pi) (N / (2k + 1) - 1), the asymptotics of LegS's eigenvalues;
    ``"lin"``: pi k, the frequencies of a Fourier basis.
    """
    k = np.arange(n, dtype=np.float64)
    if init == "legs":
        return legs_imag(n)
    if init == "inv":
        N = 2 * n
        return N / math.pi * (N / (2 * k + 1) - 1)
    if init == "lin":
        return math.pi * k
    raise ValueError(f"S4D: unknown init_method={init!r}; choose one of {', '.join(INITS)}")


def _constant(value: np.ndarray):
    def init(key, shape, dtype):
        del key
        return jnp.broadcast_to(jnp.asarray(value, jnp.float32), shape).astype(dtype)

    return init


def _log_uniform(lo: float, hi: float):
    def init(key, shape, dtype):
        u = jax.random.uniform(key, shape, jnp.float32)
        return (math.log(lo) + u * (math.log(hi) - math.log(lo))).astype(dtype)

    return init


def _complex_normal(key, shape, dtype):
    """C ~ CN(0, 1): real and imaginary parts N(0, 1/2), as ``torch.randn(cfloat)`` in S4D."""
    return (jax.random.normal(key, shape, jnp.float32) * math.sqrt(0.5)).astype(dtype)


def _to_complex(x: Array) -> Array:
    x = x.astype(jnp.float32)
    return jax.lax.complex(x[..., 0], x[..., 1])


class S4DKernel(nn.Module):
    """One diagonal SSM per channel: its parameters, kernel and discretization.

    Parameters (S4D paper sec. 4; optimizer group "ssm": log_A_real, A_imag, B; log_dt:
    ``dt_group``):
      log_dt (h,): log-uniform in [log dt_min, log dt_max], as in S4 and S4D.
      log_A_real (h, n): Re A = -exp(log_A_real), initialized to -1/2; the exp keeps Re A < 0
        (stable) whatever the optimizer does (S4D code, ``log_A_real``).
      A_imag (h, n): from ``init_method`` (:func:`init_imag`).
      B (h, n, 2): real and imaginary parts of B, initialized to 1 (sec. 4.1); a constant, not a
        parameter, when ``trainable_B`` is False.
      C (h, n, 2): real and imaginary parts of C ~ CN(0, 1) (sec. 4.1); not tagged (it is an
        output projection, trained like the rest of the network).
    """

    channels: int
    state_size: int = 32
    init_method: str = "legs"
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    discretization: str = "zoh"
    trainable_B: bool = True
    dt_group: str = "ssm"
    param_dtype: DType = jnp.float32

    def setup(self):
        h, n = self.channels, self.state_size
        hn_axes = (sharding.EMBED, sharding.STATE)
        c_axes = (sharding.EMBED, sharding.STATE, sharding.COMPLEX)
        pd = self.param_dtype
        self.log_dt = params.param(
            self,
            "log_dt",
            _log_uniform(self.dt_min, self.dt_max),
            (h,),
            (sharding.EMBED,),
            pd,
            group=self.dt_group,
        )
        self.log_A_real = params.param(
            self, "log_A_real", _constant(np.log(0.5)), (h, n), hn_axes, pd, group="ssm"
        )
        self.A_imag = params.param(
            self,
            "A_imag",
            _constant(init_imag(self.init_method, n)),
            (h, n),
            hn_axes,
            pd,
            group="ssm",
        )
        ones = np.stack([np.ones(n), np.zeros(n)], -1)  # B = 1 + 0i
        if self.trainable_B:
            self.B = params.param(self, "B", _constant(ones), (h, n, 2), c_axes, pd, group="ssm")
        else:
            self.B = jnp.broadcast_to(jnp.asarray(ones, jnp.float32), (h, n, 2))
        self.C = params.param(self, "C", _complex_normal, (h, n, 2), c_axes, pd)

    def _ssm(self) -> tuple[Array, Array, Array, Array]:
        A = jax.lax.complex(
            -jnp.exp(self.log_A_real.astype(jnp.float32)), self.A_imag.astype(jnp.float32)
        )
        return self.log_dt.astype(jnp.float32), A, _to_complex(self.B), _to_complex(self.C)

    def kernel(self, length: int) -> Array:
        """K (h, length) float32."""
        log_dt, A, B, C = self._ssm()
        return ops.s4d_kernel(log_dt, A, B, C, length, self.discretization)

    def final_state(self, x: Array) -> Array:
        """The recurrent state after reading x (b, t, h): (b, h, n) complex64."""
        log_dt, A, B, _ = self._ssm()
        return ops.s4d_final_state(x, log_dt, A, B, self.discretization)

    def scan(self, x: Array, segment_ids: Array, reverse: bool = False) -> Array:
        """The SSM over packed rows x (b, t, h) through its recurrence, the state reset at each
        document start of ``segment_ids``: y (b, t, h) float32, y_t = 2 Re(sum_n C x_t)
        (:func:`effseq.ops.s4d_scan`: C read inside the loop, so no (b, t, h, n) state
        sequence is stored). ``reverse``: the anticausal half of a bidirectional convolution
        (kernel from lag 1), reset where the next position starts a document."""
        dA, dB, C = self.discrete()
        y, _ = ops.s4d_scan(
            x.astype(jnp.float32), dA, dB, C, segment_ids=segment_ids, reverse=reverse
        )
        return y

    def discrete(self) -> tuple[Array, Array, Array]:
        """(dA, dB, C), each (h, n) complex64, for :func:`effseq.ops.s4d_step`."""
        log_dt, A, B, C = self._ssm()
        dA, dB = ops.s4d_discretize(log_dt, A, B, self.discretization)
        return dA, dB, C


def _last_document(x: Array, segment_ids: Array) -> Array:
    """x (b, t, d) with everything but each row's last document zeroed, rolled so that the
    document's last real token is at position t - 1 (trailing padding skipped): the zero-state
    recurrence over it ends in that document's state."""
    t = x.shape[1]
    idx = jnp.arange(t, dtype=jnp.int32)
    real = segments.padding_mask(segment_ids)
    last = jnp.max(jnp.where(real, idx, -1), axis=1)  # (b,), -1: no real token
    doc = segments.document_index(segments.fill_padding(segment_ids))
    last_doc = jnp.take_along_axis(doc, jnp.maximum(last, 0)[:, None], axis=1)
    keep = real & (doc == last_doc)
    x = jnp.where(keep[..., None], x, 0)
    src = (idx[None] + last[:, None] + 1) % t  # rolled[i] = x[i + last + 1 - t]
    return jnp.take_along_axis(x, src[..., None], axis=1)


class S4D(Mixer):
    """S4D mixer: y = Proj(GELU(K * x + D x)), K the SSM convolution kernel of each channel.

    Follows the mixer interface (:class:`effseq.layers.Mixer`). Shapes: x (b, t, d); the SSM
    has h = d channels of n = ``state_size`` complex modes.

    Attributes:
      d_model: width d (= number of SSM channels h).
      state_size: n complex modes per channel (2n real states); the default 32 is the S4D
        paper's and code's N = 64 (d_state), whose conjugate pairs are stored once.
      init_method: ``"legs"``, ``"inv"`` or ``"lin"`` (S4D paper sec. 4, :func:`init_imag`).
      dt_min, dt_max: range of the log-uniform step-size initialization.
      discretization: ``"zoh"`` or ``"bilinear"`` (sec. 3.1).
      trainable_B: whether B (initialized to 1) is trained.
      dt_group: optimizer group of log_dt (:mod:`effseq.layers.params`): "ssm" (the S4 layer
        default, ``lr: {dt: 0.001, ...}``) or "no_decay" (the main learning rate without weight
        decay, what state-spaces/s4's ListOps config gets with ``lr: {dt: null, ...}``).
      glu: output projection Dense d -> 2d then GLU (the S4D code's default); else Dense d -> d.
      causal: False adds a second, independent SSM kernel run backwards in time
        (:func:`effseq.ops.bidirectional_conv`); ``step`` and ``prefill`` then raise.
      conv_impl: ``impl`` of the convolution op (None: the backend's default). ``"direct"`` is
        exactly causal; ``"fft"`` is causal up to float32 roundoff.
      dtype: compute dtype; the SSM kernel and recurrence stay float32.
      param_dtype: parameter storage dtype.

    Parameters: ``kernel`` (and ``kernel_bwd``): see :class:`S4DKernel`; D (h,) skip, standard
    normal as in the S4D code, an ordinary weight-decayed parameter as there;
    ``out_kernel``/``out_bias``: the output projection.
    """

    state_size: int = 32
    init_method: str = "legs"
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    discretization: str = "zoh"
    trainable_B: bool = True
    dt_group: str = "ssm"
    glu: bool = True
    conv_impl: str | None = None

    def _kernel_module(self, name: str) -> S4DKernel:
        if self.init_method not in INITS:
            raise ValueError(
                f"S4D: unknown init_method={self.init_method!r}; choose one of {', '.join(INITS)}"
            )
        return S4DKernel(
            channels=self.d_model,
            state_size=self.state_size,
            init_method=self.init_method,
            dt_min=self.dt_min,
            dt_max=self.dt_max,
            discretization=self.discretization,
            trainable_B=self.trainable_B,
            dt_group=self.dt_group,
            param_dtype=self.param_dtype,
            name=name,
        )

    def setup(self):
        self.kernel = self._kernel_module("kernel")
        if not self.causal:
            self.kernel_bwd = self._kernel_module("kernel_bwd")
        self.D, self.out_kernel, self.out_bias = output_params(self, self.d_model, self.glu)

    def _output(self, y: Array, x: Array) -> Array:
        return conv_output(y, x, self.D, self.out_kernel, self.out_bias, self.glu, self.dtype)

    def __call__(
        self, x: Array, mask: Array | None = None, *, segment_ids: Array | None = None
    ) -> Array:
        """x (b, t, d), mask (b, t) bool or None -> y (b, t, d) in ``dtype``. Zeroed padding
        adds nothing to a convolution, in either direction.

        With ``segment_ids`` (packed documents, 0 = padding) a convolution kernel cannot stop at
        document boundaries (an FFT mixes every position), so the SSM runs through its
        recurrence instead, its state reset at every document start (:meth:`S4DKernel.scan`);
        the backward SSM of ``causal=False`` runs over the reversed rows the same way. Each
        document's outputs equal the convolution over that document alone.
        """
        mask, seg = packing("S4D", x, mask, segment_ids)
        x = zero_padding(x.astype(self.dtype), mask)
        if seg is not None:
            return self._output(self._scan(x, seg), x)
        t = x.shape[1]
        k = self.kernel.kernel(t)
        if not self.causal:
            y = ops.bidirectional_conv(x, k, self.kernel_bwd.kernel(t), impl=self.conv_impl)
        else:
            y = ops.causal_conv(x, k, impl=self.conv_impl)
        return self._output(y, x)

    def _scan(self, x: Array, seg: Array) -> Array:
        """Packed rows x (b, t, d) through the recurrence(s), seg the ops' ids -> (b, t, d)."""
        y = self.kernel.scan(x, seg)
        if not self.causal:
            y = y + self.kernel_bwd.scan(x, seg, reverse=True)
        return y.astype(x.dtype)

    def init_state(self, batch: int, max_len: int) -> Array:
        """The SSM state before any token: (b, h, n) complex64 zeros; independent of max_len."""
        del max_len
        return jnp.zeros((batch, self.d_model, self.state_size), jnp.complex64)

    def prefill(
        self, x: Array, max_len: int, *, segment_ids: Array | None = None
    ) -> tuple[Array, Array]:
        """A prompt x (b, t, d) in parallel -> (y (b, t, d), state after it (b, h, n)); with
        ``segment_ids`` (0 = padding), the state after each row's last document alone."""
        del max_len
        self.check_causal("prefill")
        if segment_ids is None:
            return self(x), self.kernel.final_state(x.astype(self.dtype))
        y = self(x, segment_ids=segment_ids)
        return y, self.kernel.final_state(_last_document(x.astype(self.dtype), segment_ids))

    def step(self, x_t: Array, state: Array) -> tuple[Array, Array]:
        """One token: x_t (b, d), state (b, h, n) -> (y_t (b, d), state)."""
        self.check_causal("step")
        x_t = x_t.astype(self.dtype)
        dA, dB, C = self.kernel.discrete()
        state, y = ops.s4d_step(state, x_t, dA, dB, C)
        return self._output(y, x_t), state
