"""Smoke test: a tiny model learns a small multi-query associative recall (MQAR) task.

Run (any mixer: s4d, sgconv, mamba, gla, attention, or a pattern such as gla,attention):

    effseq train --config experiments/smoke.py:gla --workdir /tmp/smoke

Hardware and time: one CPU core, about a minute (200 steps). What to expect: the loss falls
from about ln(64) ~ 4.2 well below 2 and validation accuracy climbs far above the 1/32 of
guessing among the values; attention and GLA reach the highest accuracy at this size.
"""

from effseq.configs import get_config as base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.task.name = "synthetic/mqar"
    c.task.options.seq_len = 64
    c.task.options.vocab_size = 64
    c.task.options.num_kv_pairs = 4
    c.task.options.num_examples = 4096
    c.task.options.num_eval_examples = 256
    c.model.mixer = arg or "gla"
    c.model.d_model = 32
    c.model.n_layers = 2
    c.train.steps = 200
    c.train.batch_size = 32
    c.train.log_every = 20
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 20
    return c
