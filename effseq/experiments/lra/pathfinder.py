"""LRA Pathfinder (Tay et al. 2021; Linsley et al. 2018): are the two dots in a 32 x 32 image
joined by a dashed path? The 1,024 pixels read row by row (task lra/pathfinder32, difficulty
curv_contour_length_14, the hardest, as in LRA).

Run (MIXER: s4d | sgconv | mamba | gla | attention, or a pattern such as gla,attention;
PRESET: cpu (default) | full):

    effseq train --config lra/pathfinder:s4d:full --workdir /tmp/pathfinder

Data: ``pathfinder32/curv_contour_length_14/`` under $EFFSEQ_DATA_DIR (the LRA release); the
first 80% (160,000) train, 10% val, 10% test. Pixels are continuous inputs (task option
continuous), fed through a linear encoder as in the S4 configs. Other resolutions:
``--config.task.name=lra/pathfinder64``.

Hardware and time: ``cpu``: d_model 32, 2 layers, 300 steps of batch 16, validation on 20
batches: an estimated several minutes per mixer on a 2-core CPU (not yet timed). Accuracy not
yet measured (the task needs long training). ``full``: the S4D recipe below, 500,000 steps of
batch 64, for an accelerator; the S4 repository reports about 7 minutes per epoch (200 epochs)
for its PyTorch S4 on one A100 (models/s4/experiments.md); not timed here.

Published test accuracy (%), as data in published.py (``*``: not yet verified
against the paper): Transformer 71.40 (Tay et al. 2021, Table 1); S4D-LegS 93.06, S4D-Inv
93.78*, S4D-Lin 93.96* (Gu et al. 2022, S4D); SGConv 95.46* (Li et al. 2022).
"""

from effseq.experiments.lra import published

TASK = "lra/pathfinder32"

# Mixer hyper-parameters (fields of the effseq.layers classes). S4D: the S4 configs' layer;
# SGConv: kernel_dim 32, decay 2 of the SGConv repository's gconv-lra-pathfinder.yaml; Mamba,
# GLA, attention: their papers' defaults, rotary positions for attention.
MIXERS = {
    # state_size counts complex modes: 32 is the paper's N = 64 real states.
    "s4d": dict(state_size=32, init_method="legs", dt_min=0.001, dt_max=0.1),
    "sgconv": dict(kernel_dim=32, decay=2.0),
    "mamba": dict(state_size=16, expand=2),
    "gla": dict(num_heads=4),
    "attention": dict(num_heads=4, rotary=True),
}

RECIPES = {
    # state-spaces/s4 configs/experiment/lra/s4-lra-pathfinder.yaml (commits ab287c6 and
    # 43f5b0c): 6 layers, d_model 256, pre-norm, BatchNorm, dropout 0, last-position pooling
    # (decoder mode last), batch 64, 200 epochs, AdamW lr 0.004, weight decay 0.03, SSM
    # parameters at lr 0.001 without weight decay, cosine schedule with 2,500 warmup steps
    # ("1 epoch"). The SGConv repository's gconv-lra-pathfinder.yaml keeps this recipe with
    # dropout 0.2. 160,000 training images.
    "full": dict(
        train_size=160_000,
        epochs=200,
        batch_size=64,
        n_layers=6,
        d_model=256,
        learning_rate=0.004,
        ssm_learning_rate=0.001,
        weight_decay=0.03,
        warmup_steps=2500,
        dropout=0.0,
        prenorm=True,
        pooling="last",
        task_options=dict(continuous=True),
        mixers=MIXERS,
        eval_batches=0,
        log_every=100,
        per_mixer={"sgconv": dict(dropout=0.2)},
    ),
    "cpu": dict(
        train_size=160_000,
        steps=300,
        batch_size=16,
        n_layers=2,
        d_model=32,
        learning_rate=0.003,
        ssm_learning_rate=0.001,
        weight_decay=0.03,
        warmup_steps=30,
        dropout=0.0,
        prenorm=True,
        pooling="last",
        task_options=dict(continuous=True),
        mixers=MIXERS,
        eval_batches=20,
        log_every=20,
    ),
}


def get_config(arg: str | None = None):
    """``arg`` = "MIXER" or "MIXER:PRESET" (defaults s4d, cpu)."""
    return published.build(TASK, RECIPES, arg)
