"""``lp-prune``: the layer-skipping frontier sweep (``sweep``), its table (``frontier``) and command
line (``cli``)."""
