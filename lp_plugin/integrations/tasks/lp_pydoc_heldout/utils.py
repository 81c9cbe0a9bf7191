"""Dataset and metrics of the ``lp_pydoc_heldout`` lm-eval task: the held-out documents of
:mod:`lp_plugin.planning.skipping.calib` (the text the ``lp-prune`` sweep measures perplexity on)."""

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
