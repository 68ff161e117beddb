"""The paper's prompt filter and the deterministic train / val / test split, vectorised in Polars."""

from __future__ import annotations

import hashlib

import numpy as np
import polars as pl

NEAR_DUPLICATE_CHARS = 50
SPLITS = ("train", "val", "test")


def _rule_flags(frame: pl.DataFrame) -> pl.DataFrame:
    """Per-row removal flags, in the paper's rule order; each row is charged to its first failing rule."""
    stripped = pl.col("prompt").cast(pl.String).str.strip_chars()
    return frame.select(
        stripped.alias("__p"),
    ).with_columns(
        (pl.col("__p").is_null() | (pl.col("__p").str.len_bytes() == 0)).alias("__empty"),
        # ASCII-only <=> as many bytes as characters (UTF-8): cheaper than a regex.
        (pl.col("__p").str.len_bytes() != pl.col("__p").str.len_chars()).alias("__non_ascii"),
    )


def filter_report(frame: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, int]]:
    """filter_prompts plus removal counts per rule: empty, non_ascii, duplicate_prefix, duplicate_suffix, kept.

    Near-duplicates run in two passes, like the paper's drop_duplicates on the first 50 characters and then
    on the last 50: the prefix pass keeps the first row of each prefix among rows that passed the earlier
    rules; the suffix pass keeps the first row of each suffix among the prefix pass's survivors.
    """
    if "prompt" not in frame.columns:
        raise ValueError("filter_prompts needs a 'prompt' column")
    n = frame.height
    stripped = pl.col("prompt").cast(pl.String).str.strip_chars()
    work = frame.with_row_index("__row").with_columns(stripped.alias("prompt"))
    empty = pl.col("prompt").is_null() | (pl.col("prompt").str.len_bytes() == 0)
    non_ascii = pl.col("prompt").str.len_bytes() != pl.col("prompt").str.len_chars()
    eligible = work.filter(~empty)
    n_empty = n - eligible.height
    eligible = eligible.filter(~non_ascii)
    n_non_ascii = n - n_empty - eligible.height
    prefix_kept = eligible.filter(pl.col("prompt").str.slice(0, NEAR_DUPLICATE_CHARS).is_first_distinct())
    suffix_kept = prefix_kept.filter(
        pl.col("prompt").str.slice(-NEAR_DUPLICATE_CHARS).is_first_distinct()
    )
    counts = {
        "empty": n_empty,
        "non_ascii": n_non_ascii,
        "duplicate_prefix": eligible.height - prefix_kept.height,
        "duplicate_suffix": prefix_kept.height - suffix_kept.height,
        "kept": suffix_kept.height,
    }
    return suffix_kept.drop("__row").select(frame.columns), counts


def filter_prompts(frame: pl.DataFrame) -> pl.DataFrame:
    """The rows of `frame` that survive the paper's filter, in input order, with "prompt" stripped."""
    return filter_report(frame)[0]


def _stable_bucket(prompts: list[str], seed: int, modulus: int) -> np.ndarray:
    """blake2b of (seed, prompt) mod `modulus`: the same in every process, machine and library version."""
    salt = f"{seed}\x00".encode()
    digests = [
        int.from_bytes(hashlib.blake2b(salt + p.encode("utf-8"), digest_size=8).digest(), "little") % modulus
        for p in prompts
    ]
    return np.asarray(digests, dtype=np.int64)


def assign_split(frame: pl.DataFrame, ratios: tuple[int, int, int] = (670, 30, 30), seed: int = 0) -> pl.DataFrame:
    """Add "split" (train / val / test) from a stable hash of the prompt text.

    Independent of row order and of other rows, so adding parts never moves an existing pair, and one
    prompt can never land in two splits.
    """
    if len(ratios) != 3 or min(ratios) < 0 or sum(ratios) <= 0:
        raise ValueError(f"split ratios must be three non-negative numbers, got {ratios!r}")
    total = int(sum(ratios))
    bucket = _stable_bucket(frame["prompt"].to_list(), seed, total)
    split = np.where(bucket < ratios[0], "train", np.where(bucket < ratios[0] + ratios[1], "val", "test"))
    return frame.with_columns(pl.Series("split", split, dtype=pl.String))
