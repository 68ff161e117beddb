"""pipeline.data.first_occurrence: the bucketed first-occurrence kernel against a one-row-at-a-time reference, at
bucket, thread and sentinel edges, and its input checks."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from pipeline.data import first_occurrence as fo

U64_MAX = np.iinfo(np.uint64).max


def reference(keys: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    seen, first = set(), np.zeros(len(keys), bool)
    for i, (key, ok) in enumerate(zip(keys.tolist(), chosen.tolist())):
        if ok and key not in seen:
            seen.add(key)
            first[i] = True
    return first


def random_keys(rng: np.random.Generator, n: int, distinct: int) -> np.ndarray:
    """n keys drawn from `distinct` well-mixed values, so most repeat; 0 and the largest u64 are among them."""
    pool = rng.integers(0, U64_MAX, size=distinct, dtype=np.uint64, endpoint=True)
    pool[:2] = (0, U64_MAX)  # the empty-slot sentinel and the last bucket
    return pool[rng.integers(0, distinct, size=n)]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n", [0, 1, 2, 5, 4095, 4097, 50_000])
def test_matches_reference(n, threads):
    rng = np.random.default_rng(n * 10 + threads)
    keys = random_keys(rng, n, max(2, n // 3))
    chosen = rng.random(n) < 0.8
    got = fo.first_occurrence(keys, chosen, threads)
    assert got.dtype == np.bool_ and got.shape == (n,)
    np.testing.assert_array_equal(got, reference(keys, chosen))


def test_keys_that_share_a_bucket_and_low_bits():
    """Keys equal in their top bits (one bucket) and in their low bits (one probe chain): only equal keys merge."""
    high = np.uint64(0xABCD) << np.uint64(48)
    keys = np.array([high | np.uint64(i << 20) for i in range(300)] * 2, dtype=np.uint64)  # low 20 bits all 0
    keys = np.concatenate([keys, np.array([0, 0, U64_MAX, U64_MAX], dtype=np.uint64)])
    chosen = np.ones(len(keys), bool)
    chosen[0] = False  # the second copy of key 0 becomes its first occurrence
    got = fo.first_occurrence(keys, chosen, threads=2)
    np.testing.assert_array_equal(got, reference(keys, chosen))
    assert got[300] and not got[0] and got.sum() == 300 + 2


def test_rows_not_chosen_claim_nothing():
    keys = np.array([7, 7, 7, 9, 9], dtype=np.uint64)
    chosen = np.array([False, True, True, False, False])
    assert fo.first_occurrence(keys, chosen).tolist() == [False, True, False, False, False]


def test_inputs_are_checked_not_cast():
    keys = np.arange(4, dtype=np.uint64)
    with pytest.raises(TypeError, match="uint64"):
        fo.first_occurrence(keys.astype(np.float64), np.ones(4, bool))  # e.g. a Polars column with nulls
    with pytest.raises(TypeError, match="bool"):
        fo.first_occurrence(keys, np.ones(4, np.int8))
    with pytest.raises(ValueError, match="same length"):
        fo.first_occurrence(keys, np.ones(3, bool))


def test_works_without_a_writable_cache():
    """Where numba finds no writable cache location (a read-only install and home), the kernels compile per
    process instead of failing the import."""
    script = (
        "import numba.core.caching as c\n"
        "c.CacheImpl._locator_classes = []\n"
        "import numpy as np\n"
        "from pipeline.data.first_occurrence import first_occurrence, _bucket_rows\n"
        "assert _bucket_rows._cache.__class__.__name__ == 'NullCache', _bucket_rows._cache\n"
        "print(first_occurrence(np.array([3, 3, 4], dtype=np.uint64), np.ones(3, bool)).tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[True, False, True]"
