"""Synthetic sequence-labelling tasks generated per index: no files, random access."""
