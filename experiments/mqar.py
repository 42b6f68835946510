"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"), CPU-sized.

Run:

    effseq train --config experiments/mqar.py:gla --workdir /tmp/mqar-gla
    effseq train --config experiments/mqar.py:attention:64 --workdir /tmp/mqar-att64

ARG is MIXER[:D_MODEL] (default gla, width 64). Each 32-token sequence holds 4 key-value
pairs, then queries of those keys; the model must output each queried key's value. Hardware
and time: a 2-core CPU, under a minute per run at width 64 (in ``make run``, at widths 48-64,
the slowest was Mamba's at 27 s, commit 8710646). What to expect: attention recalls the
pairs best; fixed-state mixers (S4D, Mamba, GLA) recall less at small width, more as their
recurrent state grows (the recall-memory trade-off of the Based paper, Arora et al. 2024);
`effseq compare --suite mqar` sweeps the width and plots accuracy against state size.
"""

from effseq.configs import get_config as base_config


def get_config(arg: str | None = None):
    mixer, _, width = (arg or "gla").partition(":")
    c = base_config()
    c.task.name = "synthetic/mqar"
    c.task.options.seq_len = 32
    c.task.options.vocab_size = 64
    c.task.options.num_kv_pairs = 4
    c.task.options.num_examples = 20000
    c.task.options.num_eval_examples = 500
    c.model.mixer = mixer or "gla"
    c.model.d_model = int(width) if width else 64
    c.model.n_layers = 2
    c.train.steps = 500
    c.train.batch_size = 32
    c.train.log_every = 50
    c.train.eval_every = 200
    c.train.checkpoint_every = 200
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 30
    c.optim.weight_decay = 0.1
    return c
