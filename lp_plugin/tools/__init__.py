"""Tools built on the library: ``lp-bench`` (``bench``), ``lp-prune`` (``prune``), the bundled real
model, config-only model shapes and the lm-eval results gate."""
