"""Integrations: ``attach`` (the engine that composes core and planning on a model), transformers
loading and NF4 quantization, and the lm-eval model, task files and registration hook."""
