"""First occurrence of each 64-bit key among chosen rows: the near-duplicate filter's inner loop.

Why not Polars' ``is_first_distinct`` (or pandas' ``duplicated``, or pyarrow's ``dictionary_encode``, all
measured): each inserts every row into one global hash table from one thread, so at DiffusionDB sizes
almost every insert is a cache miss, and the filter needs two passes, one after the other.  Here a
counting sort first groups the rows by the top bits of their key into buckets of about 4,096 rows, row
order kept inside each bucket; each bucket then gets its own small table, which stays in L2 cache, and
threads share out the buckets (equal keys always share one).  bench/filter.py measures the difference.

The kernels are compiled by numba on first use and cached on disk (next to this file, NUMBA_CACHE_DIR or
the user cache), so only the first process on a machine pays the compile (~2 s); a later process pays
~0.5 s once to import numba and load the cached code, which is why pipeline.data.filtering imports this
module only when it filters.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np


def _compiled(kernel):
    """numba-compiled `kernel`, without the GIL, cached on disk when a writable place exists (next to
    this file, NUMBA_CACHE_DIR or the user cache); otherwise compiled once per process."""
    try:
        return numba.njit(nogil=True, cache=True)(kernel)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        return numba.njit(nogil=True)(kernel)


ROWS_PER_BUCKET = 4096  # a table of 2 x 4,096 u64 slots (64 KB) stays in L2 cache


@_compiled
def _bucket_rows(keys, chosen, radix_bits, rows):
    """The chosen rows grouped by the top `radix_bits` bits of their key, row order kept inside each bucket
    (a counting sort), written into `rows` (one slot per chosen row): bucket b holds
    rows[bounds[b]:bounds[b + 1]], whose keys are bucket_keys[same]."""
    n_buckets = 1 << radix_bits
    shift = np.uint64(64 - radix_bits)
    bounds = np.zeros(n_buckets + 1, np.int64)
    for i in range(keys.shape[0]):
        if chosen[i]:
            bounds[(keys[i] >> shift) + 1] += 1
    for b in range(n_buckets):
        bounds[b + 1] += bounds[b]
    cursor = bounds[:-1].copy()
    bucket_keys = np.empty(bounds[n_buckets], np.uint64)
    for i in range(keys.shape[0]):
        if chosen[i]:
            b = keys[i] >> shift
            rows[cursor[b]] = i
            bucket_keys[cursor[b]] = keys[i]
            cursor[b] += 1
    return bounds, bucket_keys


@_compiled
def _mark_first_in_buckets(bounds, rows, bucket_keys, first_bucket, end_bucket, first):
    """Set first[row] for each row of buckets [first_bucket, end_bucket) whose key no earlier row of its
    bucket has (equal keys always share a bucket).  Open addressing, linear probing, load <= 1/2; slot
    value 0 means empty, so key 0 is tracked apart."""
    empty = np.uint64(0)
    for b in range(first_bucket, end_bucket):
        start, end = bounds[b], bounds[b + 1]
        size = 16
        while size < 2 * (end - start):
            size *= 2
        mask = np.uint64(size - 1)
        table = np.zeros(size, np.uint64)
        seen_zero = False
        for j in range(start, end):
            key = bucket_keys[j]
            if key == empty:
                if not seen_zero:
                    seen_zero = True
                    first[rows[j]] = True
                continue
            slot = key & mask  # the low bits: the top bits chose the bucket
            while True:
                held = table[slot]
                if held == empty:
                    table[slot] = key
                    first[rows[j]] = True
                    break
                if held == key:
                    break
                slot = (slot + np.uint64(1)) & mask


def first_occurrence(keys: np.ndarray, chosen: np.ndarray, threads: int = 1) -> np.ndarray:
    """Boolean mask: True at each chosen row whose key no earlier chosen row has; False elsewhere.

    keys: uint64, one per row (well-mixed hashes: buckets come from the top bits, slots from the low
    ones).  chosen: bool, same length; rows not chosen neither count nor claim a key.  threads: how
    many threads share the buckets (the GIL is released inside the kernels).
    """
    keys, chosen = np.asarray(keys), np.asarray(chosen)
    # No silent casts: a float array (e.g. a Polars column with nulls) would lose bits and merge keys.
    if keys.dtype != np.uint64 or chosen.dtype != np.bool_:
        raise TypeError(f"keys must be uint64 and chosen bool, got {keys.dtype} and {chosen.dtype}")
    if keys.ndim != 1 or chosen.shape != keys.shape:
        raise ValueError(f"keys and chosen must be 1-d and the same length, got {keys.shape} and {chosen.shape}")
    keys, chosen = np.ascontiguousarray(keys), np.ascontiguousarray(chosen)
    radix_bits = min(16, max(1, math.ceil(math.log2(max(2, len(keys) // ROWS_PER_BUCKET)))))
    # int32 row numbers where they fit: half the memory traffic of the counting sort.
    rows = np.empty(np.count_nonzero(chosen), np.int32 if len(keys) < 2**31 else np.int64)
    bounds, bucket_keys = _bucket_rows(keys, chosen, radix_bits, rows)
    first = np.zeros(len(keys), np.bool_)
    n_buckets = 1 << radix_bits
    threads = max(1, min(int(threads), n_buckets))
    if threads == 1:
        _mark_first_in_buckets(bounds, rows, bucket_keys, 0, n_buckets, first)
        return first
    # Contiguous bucket ranges of about equal row counts; each thread writes only its own rows of `first`.
    cuts = np.searchsorted(bounds, np.linspace(0, bounds[-1], threads + 1)[1:-1]).tolist()
    edges = [0, *cuts, n_buckets]
    with ThreadPoolExecutor(threads) as pool:
        jobs = [
            pool.submit(_mark_first_in_buckets, bounds, rows, bucket_keys, lo, hi, first)
            for lo, hi in zip(edges[:-1], edges[1:])
            if hi > lo
        ]
        for job in jobs:
            job.result()
    return first
