"""Architecture discovery: where a decoder-only HF model keeps its decoder layers, and the
top-level modules around them.

Supported: models whose decoder layers sit in one ``nn.ModuleList`` under the base model
(``model.layers`` for Qwen2, Llama, Mistral, ...; ``transformer.h`` / ``gpt_neox.layers`` style
paths are found too). Anything else gets an :class:`AttachError` that says what was expected.
"""

from __future__ import annotations

from ..errors import AttachError

# attribute paths tried in order, relative to the *ForCausalLM model
_LAYER_PATHS = (
    "model.layers",
    "model.decoder.layers",
    "transformer.h",
    "gpt_neox.layers",
    "transformer.layers",
    "layers",
)


def find_decoder_layers(model):
    """Return ``(prefix, layers)``: the dotted path of the decoder ``ModuleList`` and the list itself."""
    import torch.nn as nn

    for path in _LAYER_PATHS:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return path, obj
    raise AttachError(
        f"{type(model).__name__} has no decoder layer list: lp_plugin expects a decoder-only causal LM "
        f"whose layers sit in one torch.nn.ModuleList at one of {list(_LAYER_PATHS)} (Qwen2, Llama, Mistral, ...)"
    )


def text_config(config):
    """The text part of a (possibly multimodal) transformers config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def skeleton(config):
    """The causal LM of ``config`` on the meta device: module names and shapes, no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        raise AttachError(f"cannot build a causal LM from config {type(config).__name__}: {exc}") from exc
    model.tie_weights()  # tied as a loaded model is (from_config leaves that to loading)
    return model


def holds_tensors(module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def module_keys(model):
    """``(layer_prefix, other_keys, num_layers)`` of a model (also on the meta device). ``other_keys``
    are the leaf-most named children that hold parameters or buffers (embeddings, norm, rotary,
    lm_head) and are neither the decoder layer list nor one of its ancestors."""
    prefix, layers = find_decoder_layers(model)
    parts = prefix.split(".")
    ancestors = {".".join(parts[:i]) for i in range(1, len(parts))}
    other = []

    def visit(module, name):
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if full == prefix:
                continue
            if full in ancestors:
                visit(child, full)
            elif holds_tensors(child):
                other.append(full)
        # direct parameters/buffers of an ancestor module get their own key
        for pname, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            other.append(f"{name}.{pname}" if name else pname)

    visit(model, "")
    return prefix, other, len(layers)


def end_keys(model) -> tuple:
    """The module keys of the input embeddings and the lm_head (those the model has)."""
    names = {id(m): n for n, m in model.named_modules()}
    ends = [
        getattr(model, getter)() if hasattr(model, getter) else None
        for getter in ("get_input_embeddings", "get_output_embeddings")
    ]
    return tuple(names[id(m)] for m in ends if m is not None and id(m) in names)
