"""Dataset and metrics of the ``lp_pydoc_ppl``, ``lp_pydoc_chunks`` and ``lp_pydoc_long`` lm-eval tasks (offline).

Documents of ``lp_pydoc_ppl``: ``pydoc_data.topics.topics`` (topic name -> help text, shipped with
CPython), sorted by topic name, one document per topic, topics shorter than ``MIN_CHARS`` characters
dropped. ``lp_pydoc_chunks``: the same topics joined by blank lines, cut at paragraph breaks into
documents of about ``CHUNK_CHARS`` characters, so documents are of similar length (data-parallel
ranks, which lm-eval gives an equal number of documents, then get similar work). ``lp_pydoc_long``: the
same cut at ``LONG_CHUNK_CHARS`` characters, documents longer than a 32768-token window (full-context
perplexity: lm-eval's every rolling window of such a document is a full window). The text is used
verbatim (no detokenization needed, unlike wikitext). The task classes build their datasets
themselves (lm-eval's ``custom_dataset`` hook would print a warning on every run).
"""

from __future__ import annotations

import re
import sys

from lm_eval.api.task import ConfigurableTask

MIN_CHARS = 500
CHUNK_CHARS = 4000
# ~4.1 characters a token with the SmolLM2 tokenizer: 160000 characters are 35k-39k tokens (Python 3.11)
LONG_CHUNK_CHARS = 160000


def pydoc_documents(min_chars: int = MIN_CHARS) -> list:
    """The task's documents as a list of dicts ``{"topic", "text", "python_version"}``."""
    from pydoc_data.topics import topics

    version = "{}.{}".format(*sys.version_info[:2])
    return [
        {"topic": name, "text": topics[name], "python_version": version}
        for name in sorted(topics)
        if len(topics[name]) >= min_chars
    ]


def pydoc_chunks(chunk_chars: int = CHUNK_CHARS) -> list:
    """The pydoc text (topics sorted by name, joined by blank lines) in documents that each end at the
    first paragraph break after ``chunk_chars`` characters (the last one may be shorter)."""
    from pydoc_data.topics import topics

    version = "{}.{}".format(*sys.version_info[:2])
    docs, current = [], []
    size = 0
    for paragraph in "\n\n".join(topics[name] for name in sorted(topics)).split("\n\n"):
        current.append(paragraph)
        size += len(paragraph) + 2
        if size >= chunk_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        docs.append("\n\n".join(current))
    return [{"topic": f"chunk-{i:04d}", "text": text, "python_version": version} for i, text in enumerate(docs)]


class PydocPerplexityTask(ConfigurableTask):
    """The task as the YAML configures it, with its documents from :func:`pydoc_documents`."""

    def __init__(self, config=None, **kwargs):
        # lm-eval hands a ``class:`` task its whole YAML, the ``class`` key included, which the
        # task config itself does not take
        super().__init__(config={k: v for k, v in (config or {}).items() if k != "class"}, **kwargs)

    def download(self, dataset_kwargs=None, **kwargs) -> None:
        import datasets

        self.dataset = datasets.DatasetDict({"test": datasets.Dataset.from_list(self.documents())})

    def documents(self) -> list:
        return pydoc_documents()


class PydocChunksTask(PydocPerplexityTask):
    """``lp_pydoc_chunks``: the pydoc text in documents of similar length (:func:`pydoc_chunks`)."""

    def documents(self) -> list:
        return pydoc_chunks()


class PydocLongTask(PydocPerplexityTask):
    """``lp_pydoc_long``: the pydoc text in documents longer than a 32768-token window (:func:`pydoc_chunks`
    at ``LONG_CHUNK_CHARS``)."""

    def documents(self) -> list:
        return pydoc_chunks(LONG_CHUNK_CHARS)


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
