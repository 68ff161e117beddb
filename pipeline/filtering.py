"""The paper's prompt filter and the deterministic train / val / test split, vectorised in Polars."""

from __future__ import annotations

import hashlib

import numpy as np
import polars as pl

NEAR_DUPLICATE_CHARS = 50
SPLITS = ("train", "val", "test")


def filter_report(frame: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, int]]:
    """filter_prompts plus removal counts per rule: empty, non_ascii, duplicate_prefix, duplicate_suffix, kept.

    Near-duplicates run in two passes, like the paper's drop_duplicates on the first 50 characters and then
    on the last 50: the prefix pass keeps the first row of each prefix among rows that passed the earlier
    rules; the suffix pass keeps the first row of each suffix among the prefix pass's survivors.

    Speed (bench/filter.py): only the prompt column and a row index go through the rules, ASCII is tested
    as "as many UTF-8 bytes as characters" (no regex), and near-duplicate keys are compared by their 64-bit
    hashes.  Two different 50-character keys share a hash with probability ~n^2 / 2^65 (about 1e-7 for 2M
    prompts); that is the only way this filter could drop a row the rules keep.
    """
    if "prompt" not in frame.columns:
        raise ValueError("filter_prompts needs a 'prompt' column")
    n = frame.height
    stripped = pl.col("prompt").cast(pl.String).str.strip_chars()
    prompts = frame.lazy().select(stripped.alias("p")).with_row_index("row")
    eligible = prompts.filter(pl.col("p").str.len_bytes() > 0).collect()
    n_empty = n - eligible.height
    eligible = eligible.filter(pl.col("p").str.len_bytes() == pl.col("p").str.len_chars())
    n_non_ascii = n - n_empty - eligible.height
    after_prefix = eligible.filter(pl.col("p").str.head(NEAR_DUPLICATE_CHARS).hash().is_first_distinct())
    kept = after_prefix.filter(pl.col("p").str.tail(NEAR_DUPLICATE_CHARS).hash().is_first_distinct())
    counts = {
        "empty": n_empty,
        "non_ascii": n_non_ascii,
        "duplicate_prefix": eligible.height - after_prefix.height,
        "duplicate_suffix": after_prefix.height - kept.height,
        "kept": kept.height,
    }
    result = frame[kept["row"]].with_columns(kept["p"].alias("prompt")).select(frame.columns)
    return result, counts


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
