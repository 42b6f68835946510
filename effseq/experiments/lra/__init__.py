"""Long Range Arena (Tay et al. 2021): one experiment per task (``lra/listops``, ``lra/text``,
``lra/retrieval``, ``lra/image``, ``lra/pathfinder``, ``lra/pathx``), each taking
``MIXER[:PRESET]``; :mod:`.published` holds the published accuracies and the recipe -> config
step they share."""
