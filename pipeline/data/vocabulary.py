"""Vocabulary of the MLC head: the top-K content words of the training prompts, and sparse labels.

The paper keeps the K most frequent nouns, adjectives and verbs.  We have no part-of-speech tagger offline
(no model or corpus downloads at run time), so "content word" here means: lower-cased, alphabetic only
(ASCII letters, at least two of them, so "4k", "8k", "3d" and "v5" are dropped), and not in
scikit-learn's English stop-word list (which removes the articles, pronouns, prepositions and auxiliary
verbs a POS filter would drop).  One scikit-learn CountVectorizer configuration does both the fitting and
the labelling, so a label's word is always tokenised the same way as the vocabulary's.

"count" is document frequency: the number of training prompts containing the word at least once.  The
labels are multi-hot presence per prompt, so document frequency is exactly the number of positive
examples each output of the classifier gets; "detailed, highly detailed" must not count twice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl
import pyarrow as pa

# Whole alphabetic tokens of two or more letters; "octane-render" -> octane, render; "artist's" -> artist.
TOKEN_PATTERN = r"(?u)\b[a-zA-Z]{2,}\b"


def _vectorizer(vocabulary: dict[str, int] | None = None):
    """scikit-learn is imported here, on first use: most imports of this module (the code server, every run
    worker, the command line) never fit a vocabulary."""
    from sklearn.feature_extraction.text import CountVectorizer

    return CountVectorizer(
        lowercase=True,
        stop_words="english",
        token_pattern=TOKEN_PATTERN,
        binary=True,
        vocabulary=vocabulary,
        dtype=np.int32,
    )


def _texts(prompts: Sequence[str | None] | pl.Series) -> list[str]:
    values = prompts.to_list() if isinstance(prompts, pl.Series) else list(prompts)
    return [v if isinstance(v, str) else "" for v in values]


def build_vocabulary(prompts: Sequence[str] | pl.Series, k: int = 1000) -> pl.DataFrame:
    """The k content words with the highest document frequency in `prompts` (the training split):
    columns index (Int32, 0..k-1), word (String), count (Int64).  Ties are broken alphabetically, so the
    result depends only on the multiset of prompts, never on their order."""
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    texts = [t for t in _texts(prompts) if t]
    vectorizer = _vectorizer()
    try:
        matrix = vectorizer.fit_transform(texts)
    except ValueError as error:  # no prompts, or no content word in any of them
        raise ValueError(f"no content words in {len(texts)} training prompts to build a vocabulary from") from error
    doc_freq = np.asarray(matrix.sum(axis=0)).ravel().astype(np.int64)
    words = vectorizer.get_feature_names_out()
    order = np.lexsort((words, -doc_freq))[:k]
    return pl.DataFrame(
        {
            "index": np.arange(len(order), dtype=np.int32),
            "word": words[order].tolist(),
            "count": doc_freq[order],
        },
        schema={"index": pl.Int32, "word": pl.String, "count": pl.Int64},
    )


def _label_matrix(prompts: Sequence[str | None] | pl.Series, vocabulary: pl.DataFrame):
    mapping = dict(zip(vocabulary["word"].to_list(), vocabulary["index"].to_list()))
    if sorted(mapping.values()) != list(range(len(mapping))):
        raise ValueError("vocabulary indices must be 0..K-1, one per word")
    matrix = _vectorizer(vocabulary=mapping).transform(_texts(prompts)).tocsr()
    matrix.sort_indices()
    return matrix


def label_indices(prompts: Sequence[str | None] | pl.Series, vocabulary: pl.DataFrame) -> list[np.ndarray]:
    """Sparse multi-hot labels: per prompt, the sorted int32 vocabulary indices of the words it contains
    (empty for a prompt with none, or a null prompt)."""
    matrix = _label_matrix(prompts, vocabulary)
    indices = matrix.indices.astype(np.int32, copy=False)
    return np.split(indices, matrix.indptr[1:-1]) if matrix.shape[0] else []


def label_series(
    prompts: Sequence[str | None] | pl.Series, vocabulary: pl.DataFrame, name: str = "label_indices"
) -> pl.Series:
    """label_indices as a Polars List(Int32) Series, built straight from the CSR arrays (no per-row
    Python objects): the column vocabulary_labels stores."""
    matrix = _label_matrix(prompts, vocabulary)
    lists = pa.LargeListArray.from_arrays(
        pa.array(matrix.indptr.astype(np.int64)), pa.array(matrix.indices.astype(np.int32))
    )
    return pl.Series(name, lists, dtype=pl.List(pl.Int32))


def multi_hot(indices: Sequence[np.ndarray] | pl.Series, k: int) -> np.ndarray:
    """Dense float32 (n, k) multi-hot matrix from per-row index lists (for small batches and tests)."""
    rows = [
        np.asarray(x if x is not None else [], dtype=np.int64)
        for x in (indices.to_list() if isinstance(indices, pl.Series) else indices)
    ]
    out = np.zeros((len(rows), k), dtype=np.float32)
    if rows:
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        out[np.repeat(np.arange(len(rows)), lengths), np.concatenate(rows)] = 1.0
    return out
