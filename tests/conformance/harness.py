"""The conformance suite's machinery: one small configuration per mixer, the row layouts of
packed documents, and two jitted programs per mixer and direction (float32: every form at
t = 1 and t = 11 and the packed rows; float64: the references), cached (:func:`suite`) so that
every assertion reuses them.

A form is (y, gradients of every parameter, gradient of its input x) for the loss
sum(y * ct), ct a fixed random cotangent (zero on padding):

* ``reference``: the parallel form in float64 (parameters and inputs cast to float64, the
  module's dtype and param_dtype float64) inside ``jax.enable_x64`` (a context manager: the
  flag is restored on exit, and jit caches key on it, so nothing leaks into other tests);
  where a mixer cannot run in float64, the float32 parallel form stands in and the reference
  test skips, saying why;
* ``parallel``: ``__call__(x)``; ``steps``: ``init_state`` then ``step`` token by token;
  ``prefill``: ``prefill`` of the first (t + 1) // 2 tokens, then ``step`` over the rest;
* ``masked``: one batch, right-padded with junk under a ``mask``, holding in groups x of each
  length padded ("mask@t"), every packed document occurrence alone ("alone"), and each packed
  row's last document followed by the continuation ("continued"); one backward for the whole
  batch, so its parameter gradients are checked against the sum of the forms its groups
  stand for;
* ``packed``: rows of several documents (``segment_ids``; ids compare with the neighbour
  only; 0 = trailing padding); ``packed_prefill``: the packed rows prefilled, then
  ``CONTINUE`` steps.

"Alone" is thus the pre-existing masked path, which the "mask" group checks against the
unpadded float64 reference.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from effseq.models import registry
from tests.layers.protocol import run_steps

# The longest sequence any check runs (the step forms' caches, SGConv's kernel scales).
MAX_LEN = 16
# Chunk length of every chunked op: short t then spans several chunks, and documents start at
# chunk boundaries and inside chunks.
CHUNK = 4
# Fast lengths: t = 1 and a prime that is not a multiple of the chunk (11 = 2 chunks + 3);
# both run in one program with the packed rows of FAST_LAYOUT.
FAST_LENGTHS = (1, 11)
# Slow lengths: shorter than a chunk, exactly one and two chunks, one past, the cache length.
SLOW_LENGTHS = (2, 4, 5, 8, 13, 16)
PAD = 3  # junk positions appended for the padded forms
BATCH = 2
CONTINUE = 3  # tokens stepped after a packed prompt

# Small configurations of the built-in mixers (d_model 8, 1-2 heads, chunk 4). A mixer
# registered later and missing here gets DEFAULT (its own defaults at d_model 16).
CONFIGS: dict[str, dict] = {
    "s4d": dict(d_model=8, state_size=4),
    "sgconv": dict(d_model=8, kernel_dim=4),
    "mamba": dict(d_model=8, state_size=4, chunk_size=CHUNK),
    "gla": dict(d_model=8, num_heads=2, gate_low_rank=4, chunk_size=CHUNK),
    # Rotary positions (restart per document), Primer's causal conv and a window shorter
    # than t: the attention options that packing touches.
    "attention": dict(d_model=8, num_heads=2, rotary=True, dconv=True, window=6),
    "mamba2": dict(d_model=8, head_dim=8, state_size=4, chunk_size=CHUNK),
    "gdn": dict(d_model=8, num_heads=2, head_dim=4, chunk_size=CHUNK),
    "rglru": dict(d_model=8, num_heads=2),
    "based": dict(d_model=8, num_heads=2, feature_dim=4, chunk_size=CHUNK),
}
# Overrides for the bidirectional form (Primer's conv is causal only).
BIDIRECTIONAL_CONFIGS: dict[str, dict] = {
    "attention": dict(d_model=8, num_heads=2, rotary=True, window=6),
}
DEFAULT = dict(d_model=16)


def cases() -> list[tuple[str, bool]]:
    """(mixer, causal) for every registered mixer, read from the registry when called (at
    collection): every causal form, and the bidirectional one where registered."""
    out = [(name, True) for name in registry.MIXERS]
    out += [(name, False) for name in registry.MIXERS if name in registry.BIDIRECTIONAL]
    return out


def case_id(case) -> str:
    name, causal = case
    return name if causal else f"{name}-bidirectional"


def config(name: str, causal: bool) -> dict:
    if not causal and name in BIDIRECTIONAL_CONFIGS:
        return dict(BIDIRECTIONAL_CONFIGS[name])
    return dict(CONFIGS.get(name, DEFAULT))


def make(name: str, causal: bool, dtype=jnp.float32):
    return registry.MIXERS[name](
        causal=causal, max_len=MAX_LEN, dtype=dtype, param_dtype=jnp.float32, **config(name, causal)
    )


def takes_segment_ids(name: str) -> bool:
    """Whether the mixer's ``__call__`` and ``prefill`` accept ``segment_ids`` (the packing
    contract); until they do, the packed and id-padded checks fail with this reason."""
    cls = registry.MIXERS[name]
    return all(
        "segment_ids" in inspect.signature(getattr(cls, m)).parameters
        for m in ("__call__", "prefill")
    )


@functools.cache
def variables(name: str, causal: bool, seed: int = 0):
    module = make(name, causal)
    x = jnp.zeros((1, MAX_LEN, module.d_model), jnp.float32)
    return jax.jit(module.init)(jax.random.key(seed), x)


def _normal(seed, shape):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape), np.float32)


@dataclasses.dataclass
class Form:
    """One form's output y, and the gradients of sum(y * ct): ``params`` (path -> array) and
    ``x`` (of the form's input, same shape as it)."""

    y: np.ndarray
    params: dict[str, np.ndarray]
    x: np.ndarray


def _flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def _vjp(f, params, x, ct):
    y, pull = jax.vjp(f, params, x)
    g_params, g_x = pull(ct.astype(y.dtype))
    return y, g_params, g_x


def _steps_from(module, variables, state, x):
    """``step`` over x (b, t, d) from ``state``; returns y (b, t, d)."""

    def body(state, x_t):
        y_t, state = module.apply(variables, x_t, state, method="step")
        return state, y_t

    _, ys = jax.lax.scan(body, state, jnp.moveaxis(x, 1, 0))
    return jnp.moveaxis(ys, 0, 1)


def _to_np(out):
    return {k: Form(np.asarray(y), _flat(gp), np.asarray(gx)) for k, (y, gp, gx) in out.items()}


# -- row layouts of packed documents --------------------------------------------------------


@dataclasses.dataclass
class Layout:
    """Documents packed into rows: ``rows[r]`` is a list of (document, id); ``lengths`` maps a
    document to its length; each row is right-padded (id 0) to ``t``."""

    rows: list[list[tuple[str, int]]]
    lengths: dict[str, int]
    t: int

    def occurrences(self) -> list[tuple[int, int, str]]:
        """(row, start, document) of every document in every row, in row order."""
        out = []
        for r, row in enumerate(self.rows):
            start = 0
            for doc, _ in row:
                out.append((r, start, doc))
                start += self.lengths[doc]
            assert start <= self.t, "documents overflow the row"
        return out

    def ids(self) -> np.ndarray:
        ids = np.zeros((len(self.rows), self.t), np.int32)
        flat = [e for row in self.rows for e in row]
        for (r, start, doc), (_, i) in zip(self.occurrences(), flat, strict=True):
            ids[r, start : start + self.lengths[doc]] = i
        return ids


# The fast layout, t = 13 (3 chunks of 4 + 1): documents start at chunk boundaries (4, 8) and
# inside chunks (3, 5, 9); B has length 1 and ends row 1 just before its padding; A, B and C
# appear in two rows at other positions with other neighbours; id 1 comes back in row 0 for
# another document (ids compare with the neighbour only); row 0 has no padding; row 2 is one
# document right-padded by id 0 (the padded form through segment_ids).
FAST_LAYOUT = Layout(
    rows=[
        [("A", 1), ("B", 2), ("C", 3), ("D", 1)],
        [("C", 7), ("E", 4), ("A", 9), ("B", 2)],
        [("F", 5)],
    ],
    lengths=dict(A=4, B=1, C=3, D=5, E=2, F=9),
    t=13,
)


def random_layout(seed: int, t: int = 13) -> Layout:
    """Three rows of documents of random lengths 1-6 (the first of length 1), row 1 reusing a
    document of row 0 at another position, random trailing padding (0-3), random ids."""
    rng = np.random.default_rng(seed)
    lengths: dict[str, int] = {}
    rows: list[list[str]] = []
    for r in range(3):
        room = t - int(rng.integers(0, 4))
        row: list[str] = []
        if r == 1:  # a document of row 0, behind a new one
            doc = rows[0][int(rng.integers(0, len(rows[0])))]
            if lengths[doc] < room:
                lengths["x"] = 1
                row += ["x", doc]
                room -= 1 + lengths[doc]
        while room > 0:
            n = 1 if not lengths else min(room, int(rng.integers(1, 7)))
            name = f"d{len(lengths)}"
            lengths[name] = n
            row.append(name)
            room -= n
        rows.append(row)
    id_rows = []
    for row in rows:
        prev, out = -1, []
        for doc in row:
            new = prev
            while new == prev:
                new = int(rng.integers(1, 4))
            out.append((doc, new))
            prev = new
        id_rows.append(out)
    return Layout(id_rows, lengths, t)


# -- the programs ---------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    """The inputs of one program: the unpacked forms at each of ``lengths``, and packed rows
    when ``layout`` is given. The masked batch ``mx`` (rows right-padded, ``mask``) holds in
    groups: x of each length padded with junk ("mask@t"), every packed document occurrence
    alone ("alone"), each packed row's last document followed by the continuation
    ("continued", causal only). It runs one backward for its whole loss (under jax.vmap, one
    backward per group crashed XLA:CPU on Mamba-2's ops.ssd, jax 0.10.2), so its parameter
    gradients are the sum of the groups' (:meth:`Suite.expected_masked_params`)."""

    lengths: tuple[int, ...]
    layout: Layout | None
    arrays: dict[str, np.ndarray]
    groups: dict[str, list[int]]  # group -> rows of the masked batch
    occurrences: list[tuple[int, int, str]]
    last: list[tuple[int, int]]  # per packed row: (start, length) of its last document


def plan(d: int, causal: bool, lengths, layout: Layout | None, seed: int = 0) -> Plan:
    a: dict[str, np.ndarray] = {}
    rows: list[tuple[str, np.ndarray, np.ndarray, int]] = []  # (group, x, ct, real length)
    for t in lengths:
        a[f"x{t}"] = x = _normal(100 + seed + t, (BATCH, t, d))
        a[f"ct{t}"] = ct = _normal(200 + seed + t, (BATCH, t, d))
        junk = 3.0 + _normal(300 + seed + t, (BATCH, PAD, d))
        for r in range(BATCH):
            rows.append((f"mask@{t}", np.concatenate([x[r], junk[r]]), ct[r], t))
    occ: list = []
    last: list = []
    if layout is not None:
        occ = layout.occurrences()
        n_rows = len(layout.rows)
        x_doc, ct_doc = {}, {}
        for i, (k, n) in enumerate(layout.lengths.items()):
            x_doc[k] = _normal(1000 + 97 * seed + i, (n, d))
            ct_doc[k] = _normal(2000 + 97 * seed + i, (n, d))
        px = 3.0 + _normal(3000 + seed, (n_rows, layout.t, d))  # junk on the padding
        pct = np.zeros((n_rows, layout.t, d), np.float32)
        last = [(0, 0)] * n_rows
        for r, s, doc in occ:
            n = layout.lengths[doc]
            px[r, s : s + n], pct[r, s : s + n] = x_doc[doc], ct_doc[doc]
            rows.append(("alone", x_doc[doc], ct_doc[doc], n))
            last[r] = (s, n)
        a.update(px=px, pct=pct, ids=layout.ids())
        if causal:
            a["xc"] = _normal(4000 + seed, (n_rows, CONTINUE, d))
            a["ctc"] = _normal(5000 + seed, (n_rows, CONTINUE, d))
            # The prompt's cotangent covers each row's last document only: the parameter
            # gradients then match that document run alone, and every other prompt position
            # must get no gradient at all.
            a["pct_last"] = np.zeros_like(pct)
            for r, (s, n) in enumerate(last):
                a["pct_last"][r, s : s + n] = pct[r, s : s + n]
                xr = np.concatenate([px[r, s : s + n], a["xc"][r]])
                ctr = np.concatenate([pct[r, s : s + n], a["ctc"][r]])
                rows.append(("continued", xr, ctr, n + CONTINUE))
    groups: dict[str, list[int]] = {}
    if rows:
        length = max(len(x) for _, x, _, _ in rows)
        mx = np.zeros((len(rows), length, d), np.float32)
        mask = np.zeros((len(rows), length), bool)
        mct = np.zeros_like(mx)
        for i, (g, x, ct, real) in enumerate(rows):
            groups.setdefault(g, []).append(i)
            mx[i, : len(x)], mct[i, : len(ct)], mask[i, :real] = x, ct, True
        a.update(mx=mx, mask=mask, mct=mct)
    return Plan(tuple(lengths), layout, a, groups, occ, last)


def _program(module, plan: Plan, packing: bool):
    causal = module.causal

    def program(variables, a):
        params = variables["params"]

        def apply(p, *args, **kwargs):
            return module.apply({**variables, "params": p}, *args, **kwargs)

        def prefill_then_step(p, x, xc, **kwargs):
            y, state = apply(p, x, MAX_LEN, method="prefill", **kwargs)
            return y, _steps_from(module, {**variables, "params": p}, state, xc)

        out = {}
        for t in plan.lengths:
            x, ct = a[f"x{t}"], a[f"ct{t}"]
            out[f"parallel@{t}"] = _vjp(lambda p, x: apply(p, x), params, x, ct)
            if causal:
                v = variables

                def steps(p, x, v=v):
                    return run_steps(module, {**v, "params": p}, x, MAX_LEN)

                out[f"steps@{t}"] = _vjp(steps, params, x, ct)
                n = (t + 1) // 2  # t = 11: a 6-token prompt (not a chunk multiple), 5 steps

                def both(p, x, n=n):
                    return jnp.concatenate(prefill_then_step(p, x[:, :n], x[:, n:]), 1)

                out[f"prefill@{t}"] = _vjp(both, params, x, ct)
        if "mx" in a:
            out["masked"] = _vjp(lambda p, x: apply(p, x, a["mask"]), params, a["mx"], a["mct"])
        if packing:
            ids = a["ids"]
            out["packed"] = _vjp(
                lambda p, x: apply(p, x, segment_ids=ids), params, a["px"], a["pct"]
            )
            if causal:
                (y, rest), pull = jax.vjp(
                    lambda p, xs: prefill_then_step(p, *xs, segment_ids=ids),
                    params,
                    (a["px"], a["xc"]),
                )
                gp, (gx, gxc) = pull((a["pct_last"].astype(y.dtype), a["ctc"].astype(y.dtype)))
                out["packed_prefill"] = (
                    jnp.concatenate([y, rest], 1),
                    gp,
                    jnp.concatenate([gx, gxc], 1),
                )
        return out

    return jax.jit(program)


@dataclasses.dataclass
class Suite:
    """Every form of one mixer at one plan, as numpy."""

    plan: Plan
    forms: dict[str, Form]
    references: dict[int, Form] | None  # None: no float64 form (see reference_error)
    reference_error: str | None
    packing_error: str | None  # why the packed forms are missing

    def expected(self, t: int) -> Form:
        """The float64 reference at length t, or the float32 parallel form where the mixer
        has no float64 form."""
        if self.references is not None:
            return self.references[t]
        return self.forms[f"parallel@{t}"]

    def masked(self, group: str) -> Form:
        """The masked batch's rows of ``group``: outputs and gradients of x (its parameter
        gradients are the whole batch's)."""
        m, rows = self.forms["masked"], self.plan.groups[group]
        return Form(m.y[rows], m.params, m.x[rows])

    def expected_masked_params(self) -> dict[str, np.ndarray]:
        """What the masked batch's parameter gradients must be: the sum over its groups of
        the forms they stand for (each length's reference, the packed rows, the packed
        prefill then steps)."""
        terms = [self.expected(t).params for t in self.plan.lengths]
        if "alone" in self.plan.groups:
            terms.append(self.forms["packed"].params)
        if "continued" in self.plan.groups:
            terms.append(self.forms["packed_prefill"].params)
        return {k: sum(np.asarray(g[k], np.float64) for g in terms) for k in terms[0]}


def _references(module, variables, arrays, lengths):
    """The parallel form in float64 at each length: ({t: Form}, None), or (None, why not)."""
    try:
        with jax.enable_x64(True):
            module64 = module.clone(dtype=jnp.float64, param_dtype=jnp.float64)

            def cast(v):
                if jnp.issubdtype(jnp.asarray(v).dtype, jnp.floating):
                    return jnp.asarray(v, jnp.float64)
                return v

            @jax.jit
            def run(v, xs):
                def f(p, x):
                    return module64.apply({**v, "params": p}, x)

                return {t: _vjp(f, v["params"], x, ct) for t, (x, ct) in xs.items()}

            xs = {t: (arrays[f"x{t}"], arrays[f"ct{t}"]) for t in lengths}
            out = run(jax.tree.map(cast, variables), jax.tree.map(cast, xs))
            forms = {
                t: Form(np.asarray(y), _flat(gp), np.asarray(gx)) for t, (y, gp, gx) in out.items()
            }
            bad = [f.y.dtype for f in forms.values() if f.y.dtype != np.float64]
            if bad:
                return None, f"the float64 module returned {bad[0]}"
            return forms, None
    except Exception as e:  # noqa: BLE001 - any failure means "no float64 form"
        return None, f"{type(e).__name__}: {e}"


@functools.cache
def suite(name: str, causal: bool, lengths=FAST_LENGTHS, layout_seed: int | None = -1) -> Suite:
    """Every form of mixer ``name`` at each of ``lengths`` and packed on FAST_LAYOUT
    (layout_seed -1), on ``random_layout(layout_seed)``, or not at all (None). One compiled
    program for the float32 forms, one for the float64 references."""
    module = make(name, causal)
    v = variables(name, causal)
    if layout_seed is None or layout_seed < 0:
        layout, seed = (None if layout_seed is None else FAST_LAYOUT), 0
    else:
        layout, seed = random_layout(layout_seed), layout_seed + 1
    forms, error = None, None
    if layout is not None:
        if not takes_segment_ids(name):
            error = f"{name}: __call__/prefill take no segment_ids yet (packing contract)"
        else:
            p = plan(module.d_model, causal, lengths, layout, seed)
            try:
                forms = _to_np(_program(module, p, True)(v, p.arrays))
            except Exception:  # noqa: BLE001 - a layer mid-way through the contract
                error = f"{name} with segment_ids:\n{traceback.format_exc(limit=-4)}"
    if forms is None:  # the other forms do not wait for packing
        p = plan(module.d_model, causal, lengths, None, seed)
        forms = _to_np(_program(module, p, False)(v, p.arrays))
    refs, why = (None, "no length")
    if lengths:
        refs, why = _references(module, v, p.arrays, lengths)
    return Suite(p, forms, refs, why, error)


# The bfloat16 checks' width: the layer-level bfloat16 tolerance (1% relative RMS) was set at
# the layer tests' widths; at d_model 8 the error measured 0.4-1.06% (GDN, RG-LRU just over),
# at 16 0.5-0.6%.
BF16_D_MODEL = 16


@functools.cache
def bfloat16(name: str, causal: bool) -> tuple[dict[str, Form], dict[str, Form]]:
    """The fast plan's forms at t = 11 (and packed, where the mixer packs) computed in
    bfloat16, and the same in float32, both from the parameters rounded to bfloat16 (as the
    layer tests compare: the error is the computation's, not the parameters' rounding)."""
    packing = takes_segment_ids(name)
    v = jax.tree.map(
        lambda a: (
            a.astype(jnp.bfloat16).astype(jnp.float32)
            if jnp.issubdtype(a.dtype, jnp.floating)
            else a
        ),
        jax.jit(make(name, causal).clone(d_model=BF16_D_MODEL).init)(
            jax.random.key(0), jnp.zeros((1, MAX_LEN, BF16_D_MODEL), jnp.float32)
        ),
    )
    out = []
    for dtype in (jnp.bfloat16, jnp.float32):
        module = make(name, causal, dtype).clone(d_model=BF16_D_MODEL)
        p = plan(module.d_model, causal, (FAST_LENGTHS[-1],), FAST_LAYOUT if packing else None)
        out.append(_to_np(_program(module, p, packing)(v, p.arrays)))
    return out[0], out[1]
