"""The paper's prompt filter and the deterministic train / val / test split, vectorised in Polars.

The paper's filter, rules applied in this order, row order = priority:

1. strip surrounding whitespace;
2. "empty": drop null (or NaN) prompts and prompts with fewer than one word, i.e. nothing left after
   stripping (a word is a run of non-whitespace characters, as str.split() sees it, so "at least one
   word" and "not empty after strip" are the same test);
3. "non_ascii": drop prompts holding any character outside ASCII (the paper's "non-English characters");
4. "duplicate_prefix": among the rows that passed 1-3, keep only the first row of each 50-character prefix;
5. "duplicate_suffix": among the rows that passed 4, keep only the first row of each 50-character suffix.

A prompt shorter than 50 characters is its own prefix and suffix.

Near-duplicate semantics, chosen on purpose: two passes, as the paper's pandas code does it
(drop_duplicates on the first 50 characters, then on the last 50 characters).  A row dropped by an
earlier rule (empty, non-ASCII, duplicate prefix) claims nothing: it never causes a later row to be
dropped.  A row dropped by the suffix rule did survive the prefix pass, so its prefix was already taken
and it still removes later rows with that prefix.  Example, rows (prefix, suffix): A (p1, s1),
B (p2, s1), C (p2, s2) -> B shares A's suffix, C shares B's prefix: only A is kept.  (A one-pass
"greedy" reading, where only finally kept rows claim keys, would keep A and C; it cannot be vectorised
without iteration and does not reproduce the paper's counts.)  bench/filter.py's pandas reference and
tests/test_filtering.py's pure-Python reference implement these same two passes.

"Whitespace" is exactly Python's str.isspace() set (str.strip() semantics), handed to Polars as an
explicit character set: Rust's own trim() differs from Python on U+001C..U+001F.
"""

from __future__ import annotations

import hashlib

import numpy as np
import polars as pl

NEAR_DUPLICATE_CHARS = 50
SPLITS = ("train", "val", "test")
# Python's str.isspace() characters (str.strip()'s default set), so every reference agrees.
WHITESPACE = "".join(chr(c) for c in range(0x3001) if chr(c).isspace())
RULES = ("empty", "non_ascii", "duplicate_prefix", "duplicate_suffix")


def _prompt_text(frame: pl.DataFrame) -> pl.Expr:
    """The "prompt" column as stripped String; NaN (a float column, e.g. from pandas) counts as null."""
    if "prompt" not in frame.columns:
        raise ValueError("filter_prompts needs a 'prompt' column")
    col = pl.col("prompt")
    if frame.schema["prompt"].is_float():
        col = col.fill_nan(None)
    return col.cast(pl.String).str.strip_chars(WHITESPACE)


def _masks(frame: pl.DataFrame) -> tuple[pl.Series, dict[str, np.ndarray]]:
    """The stripped prompts, and one boolean array per rule outcome ("nonempty", "ascii", "first_prefix",
    "kept") over all rows of `frame`.

    Speed: one lazy Polars query over the prompt column alone does the strip, ASCII as "as many UTF-8
    bytes as characters" (no regex) and 64-bit hashes of both 50-character keys, in parallel; the two
    first-occurrence passes, which must run one after the other (the suffix rule only sees the prefix
    rule's survivors), run in pipeline.data.first_occurrence's cache-friendly kernel, 3-4x faster than Polars'
    single-threaded is_first_distinct.  No string column is filtered or gathered mid-way.  Two different
    50-character keys share a 64-bit hash with probability about n^2 / 2^65 (~1e-7 for 2M prompts); that
    is the only way this can differ from the rules.  Polars' hash is not stable across versions, which is
    fine: it never leaves this call.
    """
    # Imported here: numba costs ~0.2 s to import, and loading the Dagster definitions should not pay it.
    from pipeline.data.first_occurrence import first_occurrence

    p = pl.col("p")
    n_bytes = p.str.len_bytes()
    columns = (
        frame.lazy()
        .select(_prompt_text(frame).alias("p"))
        .with_columns(
            nonempty=(n_bytes > 0).fill_null(False),
            ascii=((n_bytes > 0) & (n_bytes == p.str.len_chars())).fill_null(False),
            prefix_key=p.str.head(NEAR_DUPLICATE_CHARS).hash(),  # never null: Polars hashes null too
            suffix_key=p.str.tail(NEAR_DUPLICATE_CHARS).hash(),
        )
        .collect()
    )
    masks = {"nonempty": columns["nonempty"].to_numpy(), "ascii": columns["ascii"].to_numpy()}
    threads = pl.thread_pool_size()
    masks["first_prefix"] = first_occurrence(columns["prefix_key"].to_numpy(), masks["ascii"], threads)
    masks["kept"] = first_occurrence(columns["suffix_key"].to_numpy(), masks["first_prefix"], threads)
    return columns["p"], masks


def filter_report(frame: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, int]]:
    """filter_prompts(frame) plus how many rows each rule removed: {"empty", "non_ascii",
    "duplicate_prefix", "duplicate_suffix", "kept"}; the five numbers sum to frame.height."""
    stripped, masks = _masks(frame)
    n_nonempty, n_ascii, n_first_prefix, n_kept = (
        int(np.count_nonzero(masks[name])) for name in ("nonempty", "ascii", "first_prefix", "kept")
    )
    counts = {
        "empty": frame.height - n_nonempty,
        "non_ascii": n_nonempty - n_ascii,
        "duplicate_prefix": n_ascii - n_first_prefix,
        "duplicate_suffix": n_first_prefix - n_kept,
        "kept": n_kept,
    }
    # Boolean filter, not a gather: Polars filters string views without copying the text.
    kept = frame.with_columns(stripped.alias("prompt")).filter(pl.Series(masks["kept"]))
    return kept, counts


def filter_prompts(frame: pl.DataFrame) -> pl.DataFrame:
    """The rows of `frame` (column "prompt", input order = priority; other columns pass through untouched)
    that survive the paper's filter, in input order, with "prompt" stripped (see the module docstring)."""
    return filter_report(frame)[0]


def stable_hash64(texts: pl.Series, seed: int = 0) -> np.ndarray:
    """uint64 blake2b-64 (little-endian) of b"<seed>\\0" + the UTF-8 text, per text: the same in every process,
    machine and library version (unlike Polars' hash).  A Python-level loop (~0.7 s per million prompts on
    one core) is acceptable here: it runs once per filtered table, not in the filter's hot path."""
    if texts.null_count():
        raise ValueError("cannot hash a null prompt; filter the frame first")
    salt = f"{seed}\x00".encode()
    blake2b = hashlib.blake2b
    values = texts.cast(pl.String).cast(pl.Binary).to_list()
    digests = b"".join([blake2b(salt + v, digest_size=8).digest() for v in values])
    return np.frombuffer(digests, dtype="<u8").copy()


def assign_split(frame: pl.DataFrame, ratios: tuple[int, int, int] = (670, 30, 30), seed: int = 0) -> pl.DataFrame:
    """Add "split" (train / val / test, about ratios[0] : ratios[1] : ratios[2]) from a stable hash of the
    stripped prompt text and `seed`.

    Each row's split depends on its own text only, never on row order or other rows, so adding parts never
    moves an existing pair and one prompt text can never land in two splits.
    """
    if len(ratios) != 3 or min(ratios) < 0 or sum(ratios) <= 0:
        raise ValueError(f"split ratios must be three non-negative numbers, got {ratios!r}")
    total = int(sum(ratios))
    texts = frame.select(_prompt_text(frame))["prompt"]
    bucket = stable_hash64(texts, seed) % np.uint64(total)
    split = np.where(bucket < ratios[0], "train", np.where(bucket < ratios[0] + ratios[1], "val", "test"))
    return frame.with_columns(pl.Series("split", split, dtype=pl.String))
