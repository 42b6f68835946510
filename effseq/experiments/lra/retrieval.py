"""LRA Retrieval (Tay et al. 2021): does one ACL Anthology paper cite the other? Two byte
sequences, encoded separately by one model (dual encoder), then classified together.

Run (MIXER: s4d | sgconv | mamba | gla | attention, or a pattern such as gla,attention;
PRESET: cpu (default) | full):

    effseq train --config lra/retrieval:s4d:full --workdir /tmp/retrieval

Data: ``tsv_data/new_aan_pairs.{train,eval,test}.tsv`` under $EFFSEQ_DATA_DIR (the LRA release).

Hardware and time: ``cpu``: d_model 32, 2 layers, 300 steps of batch 16 on the first 512 bytes
of each paper, validation on 20 batches: an estimated few minutes per mixer on a 2-core CPU (not
yet timed). Accuracy not yet measured. ``full``: the S4D recipe below, 45,960 steps of batch 64
on 2 x 4,000 bytes, for an accelerator; the S4 repository reports about 23 minutes per epoch (20
epochs) for its PyTorch S4 on one A100 (models/s4/experiments.md); not timed here.

Published test accuracy (%), as data in published.py (``*``: not yet verified
against the paper): Transformer 57.46 (Tay et al. 2021, Table 1); S4D-LegS 89.46, S4D-Inv
91.09*, S4D-Lin 90.96* (Gu et al. 2022, S4D); SGConv 91.11* (Li et al. 2022).
"""

from effseq.experiments.lra import published

TASK = "lra/retrieval"

# Mixer hyper-parameters (fields of the effseq.layers classes). S4D: the S4 configs' layer;
# SGConv: kernel_dim 1, decay 2 of the SGConv repository's gconv-lra-aan.yaml; Mamba, GLA,
# attention: their papers' defaults, rotary positions for attention.
MIXERS = {
    # state_size counts complex modes: 32 is the paper's N = 64 real states.
    "s4d": dict(state_size=32, init_method="legs", dt_min=0.001, dt_max=0.1),
    "sgconv": dict(kernel_dim=1, decay=2.0),
    "mamba": dict(state_size=16, expand=2),
    "gla": dict(num_heads=4),
    "attention": dict(num_heads=4, rotary=True),
}

RECIPES = {
    # state-spaces/s4 configs/experiment/lra/s4-lra-aan.yaml (commit d589d98): 6 layers,
    # d_model 256, pre-norm, BatchNorm, dropout 0, batch 64, 20 epochs, AdamW lr 0.01, weight
    # decay 0.05, A and B at lr 0.001 without weight decay, cosine schedule with 2,500 warmup
    # steps ("1 epoch" in the file). Pooling: the file sets none and the aan pipeline file was
    # not found, so mean pooling is assumed (unverified). The SGConv repository's
    # gconv-lra-aan.yaml keeps this recipe with batch 32 on each of 2 GPUs (64 in all).
    # 147,086 training pairs.
    "full": dict(
        train_size=147_086,
        epochs=20,
        batch_size=64,
        n_layers=6,
        d_model=256,
        learning_rate=0.01,
        ssm_learning_rate=0.001,
        weight_decay=0.05,
        warmup_steps=2500,
        dropout=0.0,
        prenorm=True,
        pooling="mean",
        task_options=dict(max_length=4000),
        mixers=MIXERS,
        eval_batches=0,
        log_every=100,
    ),
    "cpu": dict(
        train_size=147_086,
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
