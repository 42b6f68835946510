"""An example user experiment: the built-in smoke experiment at half its width.

Run from the checkout root (a file outside the package is addressed by its path):

    effseq train --config experiments/example.py:gla --workdir /tmp/example

ARG is handed on to the smoke experiment (a mixer name or a pattern such as gla,attention).
Like every experiment, it starts from a config (a built-in experiment's, or
``effseq.configs.get_config()``) and changes values; it never adds keys.
"""

from effseq.experiments import smoke


def get_config(arg: str | None = None):
    c = smoke.get_config(arg)
    c.model.d_model = 32
    return c
