"""Vocabulary of the MLC head: top-K content words of the training prompts, and sparse labels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl
from sklearn.feature_extraction.text import CountVectorizer

TOKEN_PATTERN = r"(?u)\b[a-zA-Z]{3,}\b"


def _vectorizer(vocabulary=None) -> CountVectorizer:
    return CountVectorizer(
        lowercase=True, stop_words="english", token_pattern=TOKEN_PATTERN, binary=True, vocabulary=vocabulary
    )


def build_vocabulary(prompts: Sequence[str] | pl.Series, k: int = 1000) -> pl.DataFrame:
    texts = [p for p in (prompts.to_list() if isinstance(prompts, pl.Series) else prompts) if p]
    if not texts:
        raise ValueError("no training prompts to build a vocabulary from")
    vectorizer = _vectorizer()
    counts = vectorizer.fit_transform(texts)
    doc_freq = np.asarray(counts.sum(axis=0)).ravel()
    words = vectorizer.get_feature_names_out()
    order = np.lexsort((words, -doc_freq))[:k]
    return pl.DataFrame(
        {"index": np.arange(len(order), dtype=np.int32), "word": words[order].tolist(), "count": doc_freq[order].astype(np.int64)}
    )


def label_indices(prompts: Sequence[str] | pl.Series, vocabulary: pl.DataFrame) -> list[np.ndarray]:
    texts = [p or "" for p in (prompts.to_list() if isinstance(prompts, pl.Series) else prompts)]
    vectorizer = _vectorizer(vocabulary={w: int(i) for i, w in zip(vocabulary["index"], vocabulary["word"])})
    matrix = vectorizer.transform(texts).tocsr()
    matrix.sort_indices()
    return [matrix.indices[matrix.indptr[i] : matrix.indptr[i + 1]].astype(np.int32) for i in range(matrix.shape[0])]
