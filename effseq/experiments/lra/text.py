"""LRA Text (Tay et al. 2021): IMDB review sentiment from the review's bytes.

Run (MIXER: s4d | sgconv | mamba | gla | attention, or a pattern such as gla,attention;
PRESET: cpu (default) | full):

    effseq train --config lra/text:s4d:full --workdir /tmp/text

Data: ``aclImdb/{train,test}/{pos,neg}/*.txt`` under $EFFSEQ_DATA_DIR (the standard IMDB
release). As in LRA, validation is the test set (task option val_fraction 0).

Hardware and time: ``cpu``: d_model 32, 2 layers, 300 steps of batch 16 on the first 512 bytes,
validation on 20 batches: an estimated few minutes per mixer on a 2-core CPU (not yet timed).
Accuracy not yet measured. ``full``: the S4D recipe below, 49,984 steps of batch 16 on 4,096
bytes, for an accelerator; the S4 repository reports about 17 minutes per epoch (32 epochs) for
its PyTorch S4 on one T4 (models/s4/experiments.md); not timed here.

Published test accuracy (%), as data in published.py (``*``: not yet verified
against the paper): Transformer 64.27 (Tay et al. 2021, Table 1); S4D-LegS 86.18, S4D-Inv
87.34*, S4D-Lin 86.97* (Gu et al. 2022, S4D); SGConv 89.20* (Li et al. 2022).
"""

from effseq.experiments.lra import published

TASK = "lra/text"

# Mixer hyper-parameters (fields of the effseq.layers classes). S4D: the S4 configs' layer;
# SGConv: kernel_dim 2, decay 2 of the SGConv repository's gconv-lra-imdb.yaml; Mamba, GLA,
# attention: their papers' defaults, rotary positions for attention.
MIXERS = {
    # state_size counts complex modes: 32 is the paper's N = 64 real states.
    "s4d": dict(state_size=32, init_method="legs", dt_min=0.001, dt_max=0.1),
    "sgconv": dict(kernel_dim=2, decay=2.0),
    "mamba": dict(state_size=16, expand=2),
    "gla": dict(num_heads=4),
    "attention": dict(num_heads=4, rotary=True),
}

RECIPES = {
    # state-spaces/s4 configs/experiment/lra/s4-lra-imdb.yaml (commit ab287c6): 6 layers,
    # d_model 256, pre-norm, BatchNorm, dropout 0, mean pooling (decoder mode pool overrides the
    # imdb pipeline's "last"), l_max 4096 bytes, batch 16, 32 epochs, AdamW lr 0.01, weight
    # decay 0.05, A and B at lr 0.001 without weight decay, cosine schedule with the default
    # 1,000 warmup steps. The SGConv repository's gconv-lra-imdb.yaml keeps this backbone and
    # optimizer. 25,000 training reviews.
    "full": dict(
        train_size=25_000,
        epochs=32,
        batch_size=16,
        n_layers=6,
        d_model=256,
        learning_rate=0.01,
        ssm_learning_rate=0.001,
        weight_decay=0.05,
        warmup_steps=1000,
        dropout=0.0,
        prenorm=True,
        pooling="mean",
        task_options=dict(max_length=4096),
        mixers=MIXERS,
        eval_batches=0,
        log_every=100,
    ),
    "cpu": dict(
        train_size=25_000,
        steps=300,
        batch_size=16,
        n_layers=2,
        d_model=32,
        learning_rate=0.003,
        ssm_learning_rate=0.001,
        weight_decay=0.05,
        warmup_steps=30,
        dropout=0.0,
        prenorm=True,
        pooling="mean",
        task_options=dict(max_length=512),
        mixers=MIXERS,
        eval_batches=20,
        log_every=20,
    ),
}


def get_config(arg: str | None = None):
    """``arg`` = "MIXER" or "MIXER:PRESET" (defaults s4d, cpu)."""
    return published.build(TASK, RECIPES, arg)
