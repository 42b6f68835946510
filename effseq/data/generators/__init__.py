"""Offline, seeded generators that write the official LRA file layouts."""

from effseq.data.generators.listops import generate_listops
from effseq.data.generators.pathfinder import generate_pathfinder

__all__ = ["generate_listops", "generate_pathfinder"]
