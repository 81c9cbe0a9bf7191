"""Dataset and metrics of the ``lp_pydoc_ppl`` lm-eval task (offline, no download).

Documents: ``pydoc_data.topics.topics`` (topic name -> help text, shipped with CPython), sorted by
topic name, one document per topic, topics shorter than ``MIN_CHARS`` characters dropped. The text
is used verbatim (no detokenization needed, unlike wikitext).
"""

from __future__ import annotations

import re
import sys

MIN_CHARS = 500


def pydoc_documents(min_chars: int = MIN_CHARS) -> list:
    """The task's documents as a list of dicts ``{"topic", "text", "python_version"}``."""
    from pydoc_data.topics import topics

    version = "%d.%d" % sys.version_info[:2]
    return [
        {"topic": name, "text": topics[name], "python_version": version}
        for name in sorted(topics)
        if len(topics[name]) >= min_chars
    ]


def load_pydoc_topics(**kwargs):
    """``custom_dataset`` hook: lm-eval calls it with the task metadata (and, through the
    TaskManager, the run's model_args) as keyword arguments; they are ignored."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(pydoc_documents())})


def doc_to_target(doc) -> str:
    return doc["text"]


def process_results(doc, results):
    (loglikelihood,) = results
    # same conventions as lm-eval's wikitext task
    words = len(re.split(r"\s+", doc["text"]))
    nbytes = len(doc["text"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, nbytes),
        "bits_per_byte": (loglikelihood, nbytes),
    }
