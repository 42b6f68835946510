"""LRA Image (Tay et al. 2021): CIFAR-10 classes from the 1,024 grayscale pixels of an image,
read row by row.

Run (MIXER: s4d | sgconv | mamba | gla | attention, or a pattern such as gla,attention;
PRESET: cpu (default) | full):

    effseq train --config lra/image:s4d:full --workdir /tmp/image

Data: ``cifar-10-batches-py/`` under $EFFSEQ_DATA_DIR (the CIFAR-10 python release); 45,000
train, 5,000 val, 10,000 test. Pixels are continuous inputs in [-1, 1] (task option
continuous), fed through a linear encoder as in the S4 configs (encoder: linear).

Hardware and time: ``cpu``: d_model 32, 2 layers, 300 steps of batch 16 on all 1,024 pixels,
validation on 20 batches: an estimated several minutes per mixer on a 2-core CPU (not yet
timed). Accuracy not yet measured. ``full``: the S4D recipe below, 180,000 steps of batch 50,
for an accelerator; the S4 repository reports about 2 minutes per epoch (200 epochs) for its
PyTorch S4 on one A100 (models/s4/experiments.md); not timed here.

Published test accuracy (%), as data in published.py (``*``: not yet verified
against the paper): Transformer 42.44 (Tay et al. 2021, Table 1); S4D-LegS 88.19, S4D-Inv
87.83*, S4D-Lin 87.93* (Gu et al. 2022, S4D); SGConv 87.97* (Li et al. 2022).
"""

from effseq.experiments.lra import published

TASK = "lra/image"

# Mixer hyper-parameters (fields of the effseq.layers classes). S4D: the S4 configs' layer
# (n_ssm 2 there shares SSMs between channels; effseq's S4D gives each channel its own);
# SGConv: kernel_dim 32, decay 1 of the SGConv repository's gconv-lra-cifar.yaml (its mode
# "cat_randn_learnable_fixed" has no effseq counterpart); Mamba, GLA, attention: their papers'
# defaults, rotary positions for attention.
MIXERS = {
    # state_size counts complex modes: 32 is the paper's N = 64 real states.
    "s4d": dict(state_size=32, init_method="legs", dt_min=0.001, dt_max=0.1),
    "sgconv": dict(kernel_dim=32, decay=1.0),
    "mamba": dict(state_size=16, expand=2),
    "gla": dict(num_heads=4),
    "attention": dict(num_heads=4, rotary=True),
}

RECIPES = {
    # state-spaces/s4 configs/experiment/lra/s4-lra-cifar.yaml (commits ab287c6 and 43f5b0c):
    # 6 layers, d_model 512, post-norm, LayerNorm, dropout 0.1 (tied across time there), mean
    # pooling (the cifar pipeline's decoder mode pool), grayscale, batch 50, 200 epochs, AdamW
    # lr 0.01, weight decay 0.05, A and B at lr 0.001 without weight decay, cosine schedule with
    # the default 1,000 warmup steps. The SGConv repository's gconv-lra-cifar.yaml keeps this
    # recipe with dropout 0.2. 45,000 training images.
    "full": dict(
        train_size=45_000,
        epochs=200,
        batch_size=50,
        n_layers=6,
        d_model=512,
        learning_rate=0.01,
        ssm_learning_rate=0.001,
        weight_decay=0.05,
        warmup_steps=1000,
        dropout=0.1,
        prenorm=False,
        pooling="mean",
        task_options=dict(continuous=True),
        mixers=MIXERS,
        eval_batches=0,
        log_every=100,
        per_mixer={"sgconv": dict(dropout=0.2)},
    ),
    "cpu": dict(
        train_size=45_000,
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
        task_options=dict(continuous=True),
        mixers=MIXERS,
        eval_batches=20,
        log_every=20,
    ),
}


def get_config(arg: str | None = None):
    """``arg`` = "MIXER" or "MIXER:PRESET" (defaults s4d, cpu)."""
    return published.build(TASK, RECIPES, arg)
