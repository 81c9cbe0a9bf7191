"""Dataset and metrics of the ``lp_pydoc_ppl`` lm-eval task (offline, no download).

Documents: ``pydoc_data.topics.topics`` (topic name -> help text, shipped with CPython), sorted by
topic name, one document per topic, topics shorter than ``MIN_CHARS`` characters dropped. The text
is used verbatim (no detokenization needed, unlike wikitext). :class:`PydocPerplexityTask` builds
the dataset itself (lm-eval's ``custom_dataset`` hook would print a warning on every run).
"""

from __future__ import annotations

import re
import sys

from lm_eval.api.task import ConfigurableTask

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


class PydocPerplexityTask(ConfigurableTask):
    """The task as the YAML configures it, with its documents from :func:`pydoc_documents`."""

    def __init__(self, config=None, **kwargs):
        # lm-eval hands a ``class:`` task its whole YAML, the ``class`` key included, which the
        # task config itself does not take
        super().__init__(config={k: v for k, v in (config or {}).items() if k != "class"}, **kwargs)

    def download(self, dataset_kwargs=None, **kwargs) -> None:
        import datasets

        self.dataset = datasets.DatasetDict({"test": datasets.Dataset.from_list(pydoc_documents())})


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
