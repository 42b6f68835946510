"""Built-in experiments: one module per experiment, each with ``get_config(arg)``.

Addressed by name, the module path with "/" for subpackages, then ":ARG" for ``get_config``:
``effseq train --config smoke:gla``, ``--config lra/listops:s4d:cpu`` (see
:func:`effseq.configs.load_config`, which also lists them). Experiments only build configs.
"""
