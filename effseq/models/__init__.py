"""Models built from the mixers: residual blocks, scanned stacks, classifier and language model,
all configured by one :class:`Backbone`."""

from effseq.models.backbone import Backbone
from effseq.models.blocks import MLP, ResidualBlock
from effseq.models.classifier import SequenceClassifier
from effseq.models.language_model import LanguageModel
from effseq.models.registry import MIXERS, parse_pattern, register_mixer
from effseq.models.stack import Stack

__all__ = [
    "MIXERS",
    "MLP",
    "Backbone",
    "LanguageModel",
    "ResidualBlock",
    "SequenceClassifier",
    "Stack",
    "parse_pattern",
    "register_mixer",
]
