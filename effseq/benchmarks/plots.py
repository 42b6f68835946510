"""Log-log figures of the model benchmark's results (matplotlib, Agg backend: no display)."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def _series(records, mixer, x_key, y_key, scale=1.0):
    pts = sorted(
        (r[x_key], r[y_key] * scale)
        for r in records
        if r["mixer"] == mixer and r.get(y_key) is not None and "skipped" not in r
    )
    return [x for x, _ in pts], [y for _, y in pts]


def _panel(ax, records, mixers, x_key, y_key, ylabel, scale=1.0, x_label="sequence length"):
    drawn = False
    for m in mixers:
        xs, ys = _series(records, m, x_key, y_key, scale)
        if xs:
            ax.plot(xs, ys, marker="o", label=m)
            drawn = True
    if drawn:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel(x_label)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    return drawn


def _save(fig, path: pathlib.Path, drawn: bool, written: list[pathlib.Path]) -> None:
    """Writes ``fig`` to ``path`` (and lists it in ``written``) when it shows any data."""
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=110)
        written.append(path)
    plt.close(fig)


def plot_models(result: dict, out: pathlib.Path) -> list[pathlib.Path]:
    """models_train.png (step time, tokens/s, peak memory vs length) and models_decode.png
    (per-token latency, cache memory vs context) in ``out``; returns the files written (a
    figure with nothing measured is not written)."""
    mixers = result["plan"]["mixers"]
    prov = result["provenance"]
    where = f"{prov['device_kind']} ({prov['backend']}, {prov['cpu_count']} cores), {prov['date']}"
    written = []

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    train = result["train"]
    drawn = _panel(axes[0], train, mixers, "length", "median_s", "train step (ms)", 1e3)
    _panel(axes[1], train, mixers, "length", "tokens_per_s", "tokens / s")
    _panel(axes[2], train, mixers, "length", "peak_bytes", "peak memory (MiB)", 2.0**-20)
    fig.suptitle(f"training step vs length: {where}", fontsize=10)
    _save(fig, out / "models_train.png", drawn, written)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    decode = result["decode"]
    drawn = _panel(
        axes[0], decode, mixers, "context", "median_s", "ms / token", 1e3, x_label="context"
    )
    _panel(axes[1], decode, mixers, "context", "cache_bytes", "cache (MiB)", 2.0**-20, "context")
    fig.suptitle(f"decoding vs context: {where}", fontsize=10)
    _save(fig, out / "models_decode.png", drawn, written)
    return written
