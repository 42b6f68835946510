"""Writes the converter fixtures (tests/convert/fixtures/<mixer>-<i>.npz) from the official
modules. Needs torch and the official sources (see tests/convert/official.py):

    EFFSEQ_OFFICIAL_SRC=/path/to/checkouts python -m tests.convert.make_fixtures [MIXER ...]

Each file holds "options" (the effseq options, JSON), "x" (2, t, d) float32, "y" the official
module's output on x, and "state/<key>" per state-dict entry. ``make test`` checks the
converters against these files without torch.
"""

from __future__ import annotations

import importlib
import json
import pathlib
import sys

import numpy as np

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
# The modules that run each official source: CASES {mixer: [options]} and run(...).
RUNNERS = ("official_mamba", "official_fla", "official_rglru", "official_based")
T = 13  # prime, longer than the conv widths and than the official chunk set in the runners


def cases():
    for runner in RUNNERS:
        module = importlib.import_module(f"tests.convert.{runner}")
        for name, options in module.CASES.items():
            for i, o in enumerate(options):
                yield module, name, i, o


def write(module, name: str, i: int, options: dict, seed: int = 0) -> pathlib.Path:
    rng = np.random.default_rng(1000 + i)
    x = rng.standard_normal((2, T, options["d_model"])).astype(np.float32)
    state, y = module.run(name, options, seed + i, x)
    path = FIXTURES / f"{name}-{i}.npz"
    arrays = {f"state/{k}": np.asarray(v, np.float32) for k, v in state.items()}
    np.savez_compressed(
        path, options=np.array(json.dumps(options)), x=x, y=np.asarray(y, np.float32), **arrays
    )
    return path


def main(argv: list[str]) -> None:
    FIXTURES.mkdir(exist_ok=True)
    for module, name, i, options in cases():
        if argv and name not in argv:
            continue
        path = write(module, name, i, options)
        print(f"{path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv[1:])
