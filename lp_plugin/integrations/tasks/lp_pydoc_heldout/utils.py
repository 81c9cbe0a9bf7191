"""Dataset and metrics of the held-out lm-eval tasks of layer skipping: ``lp_pydoc_heldout`` (the
held-out documents of :mod:`lp_plugin.planning.skipping.calib`, slice ``pydoc-a``) and one task per other
slice of :mod:`lp_plugin.planning.skipping.domains` (``lp_heldout_pydoc_b``, ``lp_heldout_license``,
``lp_heldout_docstrings``): the text the ``lp-prune`` sweep measures perplexity on."""

from __future__ import annotations

from lp_plugin.integrations.tasks.lp_pydoc_ppl.utils import doc_to_target  # noqa: F401 - the YAML names it here
from lp_plugin.integrations.tasks.lp_pydoc_ppl.utils import process_results as text_metrics
from lp_plugin.planning.skipping.calib import HELDOUT, WINDOW, document_ids, heldout_documents


def load_heldout(
    pretrained=None, tokenizer=None, heldout_start=HELDOUT[0], heldout_end=HELDOUT[1], heldout_window=WINDOW, **kwargs
):
    """``custom_dataset`` hook: lm-eval passes the run's model_args and ``--metadata`` as keywords."""
    import datasets
    from transformers import AutoTokenizer

    source = tokenizer or pretrained
    if not isinstance(source, str) or not source:
        raise ValueError(
            "lp_pydoc_heldout cuts the text with the model's tokenizer: pass model_args pretrained=PATH "
            "(or tokenizer=PATH)"
        )
    tok = AutoTokenizer.from_pretrained(source)
    docs = heldout_documents(tok, int(heldout_start), int(heldout_end), int(heldout_window))
    rows = [{"index": i, "text": text, "tokens": len(document_ids(tok, text))} for i, text in enumerate(docs)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def process_results(doc, results):
    """lp_pydoc_ppl's metrics (lm-eval's wikitext conventions) plus the sweep's ``token_perplexity``."""
    (loglikelihood,) = results
    return {"token_perplexity": (loglikelihood, doc["tokens"]), **text_metrics(doc, results)}


def _load_slice(name, pretrained=None, tokenizer=None, heldout_window=WINDOW, **kwargs):
    import datasets
    from transformers import AutoTokenizer

    from lp_plugin.planning.skipping.domains import SLICES, slice_documents

    source = tokenizer or pretrained
    if not isinstance(source, str) or not source:
        raise ValueError(
            f"the held-out slice {name!r} is cut with the model's tokenizer: pass model_args pretrained=PATH "
            "(or tokenizer=PATH)"
        )
    tok = AutoTokenizer.from_pretrained(source)
    docs = slice_documents(tok, SLICES[name], int(heldout_window))
    rows = [{"index": i, "text": text, "tokens": len(document_ids(tok, text))} for i, text in enumerate(docs)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_pydoc_b(**kwargs):
    """``custom_dataset`` hook of ``lp_heldout_pydoc_b``: pydoc tokens 8192-12288."""
    return _load_slice("pydoc-b", **kwargs)


def load_license(**kwargs):
    """``custom_dataset`` hook of ``lp_heldout_license``: CPython's LICENSE.txt."""
    return _load_slice("license", **kwargs)


def load_docstrings(**kwargs):
    """``custom_dataset`` hook of ``lp_heldout_docstrings``: the standard library's docstrings."""
    return _load_slice("docstrings", **kwargs)
