"""pipeline.data.filtering: the paper's rules one by one, edge cases, a pure-Python reference on random input,
and the split's determinism / order independence / disjointness / ratios."""

from __future__ import annotations

import math
import random

import numpy as np
import polars as pl
import pytest

from pipeline.data.filtering import assign_split, filter_prompts, filter_report, stable_hash64

LONG = "a castle on a hill at dawn, matte painting, by greg rutkowski, trending on artstation"


def reference_filter(prompts: list) -> list[int]:
    """Row numbers kept, by the rules as written, one row at a time (see pipeline.data.filtering's docstring)."""
    eligible = []
    for i, p in enumerate(prompts):
        if p is None or (isinstance(p, float) and math.isnan(p)):
            continue
        s = p.strip()
        if len(s.split()) < 1 or not s.isascii():
            continue
        eligible.append((i, s))
    seen_prefix, after_prefix = set(), []
    for i, s in eligible:
        if s[:50] not in seen_prefix:
            seen_prefix.add(s[:50])
            after_prefix.append((i, s))
    seen_suffix, kept = set(), []
    for i, s in after_prefix:
        if s[-50:] not in seen_suffix:
            seen_suffix.add(s[-50:])
            kept.append(i)
    return kept


def frame(prompts) -> pl.DataFrame:
    return pl.DataFrame(
        {"id": list(range(len(prompts))), "prompt": prompts}, schema={"id": pl.Int64, "prompt": pl.String}
    )


def kept_ids(prompts) -> list[int]:
    return filter_prompts(frame(prompts))["id"].to_list()


def test_empty_rule_null_blank_whitespace():
    prompts = [None, "", "   ", "\t\n ", "\u3000\xa0", "\x1c", "cat"]
    out, counts = filter_report(frame(prompts))
    assert out["id"].to_list() == [6]
    assert counts == {"empty": 6, "non_ascii": 0, "duplicate_prefix": 0, "duplicate_suffix": 0, "kept": 1}


def test_nan_in_a_float_column_counts_as_empty():
    out, counts = filter_report(pl.DataFrame({"prompt": [float("nan"), None, 1.5]}))
    assert counts["empty"] == 2 and out["prompt"].to_list() == ["1.5"]


def test_single_word_is_kept_and_stripped():
    out = filter_prompts(frame(["  dragon \n"]))
    assert out["prompt"].to_list() == ["dragon"]


def test_non_ascii_is_dropped_after_strip():
    prompts = ["café au lait", "a cat 🐱", "東京 at night", "em—dash", "\u3000plain ascii\u3000", "naïve"]
    out, counts = filter_report(frame(prompts))
    assert out["prompt"].to_list() == ["plain ascii"]  # Unicode whitespace is stripped, not "non-ASCII"
    assert counts["non_ascii"] == 5


def test_exact_duplicate_after_strip_keeps_first():
    out, counts = filter_report(frame(["a red cat", "  a red cat\t", "a red cat"]))
    assert out["id"].to_list() == [0]
    assert out["prompt"].to_list() == ["a red cat"]
    assert counts["duplicate_prefix"] == 2


def test_prefix_and_suffix_duplicates():
    prompts = [
        LONG,
        LONG[:50] + " something else entirely, a different ending",  # shares the first 50 characters
        "a different beginning, and more words, " + LONG[-50:],  # shares the last 50 characters
        LONG[:20] + "X" + LONG[21:],  # differs at character 21 (inside the first 50 only): shares the suffix
        "Y" + LONG[1:],  # differs at the first character: the suffix is shared
    ]
    out, counts = filter_report(frame(prompts))
    assert out["id"].to_list() == [0]
    assert counts["duplicate_prefix"] == 1 and counts["duplicate_suffix"] == 3


def test_exactly_50_and_shorter_than_50_characters():
    fifty = "x" * 48 + " y"
    assert len(fifty) == 50
    # a 50-char prompt is its own prefix; a longer prompt starting with it shares the prefix
    assert kept_ids([fifty, fifty + " more"]) == [0]
    # shorter prompts compare whole text: a prefix of another short prompt is not a duplicate
    assert kept_ids(["cat", "cat dog", "dog", "a cat"]) == [0, 1, 2, 3]
    # the last 50 characters of a 51-character prompt can be a whole 50-character prompt: suffix duplicate
    assert kept_ids(["z" + fifty, fifty]) == [0]
    assert kept_ids(["z" + fifty, fifty + "w"]) == [0, 1]


def test_a_row_removed_earlier_claims_nothing():
    a = "A" * 30 + " " + "p" * 30  # prefix pA, suffix s1
    # removed as non-ASCII: must not remove a later prompt with the same prefix
    assert kept_ids(["é" + a[1:], "é" + a[1:], a]) == [2]
    # removed by the prefix rule: must not claim its suffix
    b = a[:50] + "Q" * 40  # same prefix as a, new suffix sB
    c = "C" * 40 + b[-50:]  # suffix sB
    assert kept_ids([a, b, c]) == [0, 2]


def test_two_pass_semantics_a_suffix_duplicate_still_holds_its_prefix():
    # (p1, s1), (p2, s1), (p2, s2): the second shares the first's suffix (dropped in the suffix pass), but
    # it survived the prefix pass, so the third shares a taken prefix: only the first is kept.
    p1, p2, s1, s2 = "1" * 50, "2" * 50, "a" * 50, "b" * 50
    prompts = [p1 + " " + s1, p2 + " " + s1, p2 + " " + s2]
    out, counts = filter_report(frame(prompts))
    assert out["id"].to_list() == [0] == reference_filter(prompts)
    assert counts["duplicate_prefix"] == 1 and counts["duplicate_suffix"] == 1


def test_order_and_other_columns_pass_through():
    f = pl.DataFrame(
        {"image_id": ["b", "a", "c", "d"], "prompt": ["z prompt", "  y prompt ", "z prompt", "x"], "seed": [3, 1, 2, 9]}
    )
    out = filter_prompts(f)
    assert out.columns == ["image_id", "prompt", "seed"]
    assert out.schema == f.schema
    assert out.to_dict(as_series=False) == {
        "image_id": ["b", "a", "d"],
        "prompt": ["z prompt", "y prompt", "x"],
        "seed": [3, 1, 9],
    }


def test_empty_frame_and_missing_column():
    out, counts = filter_report(frame([]))
    assert out.height == 0 and counts["kept"] == 0 and sum(counts.values()) == 0
    with pytest.raises(ValueError):
        filter_prompts(pl.DataFrame({"text": ["a"]}))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_pure_python_reference_on_random_prompts(seed):
    rng = random.Random(seed)
    words = ["red", "cat", "blue", "dog", "by", "artstation", "4k", "octane", "render", "x", "portrait"]
    prompts: list = []
    for _ in range(4000):
        r = rng.random()
        if r < 0.1 and prompts:
            prompts.append(rng.choice(prompts))
        elif r < 0.2 and prompts and isinstance(prompts[-1], str):  # reuse an earlier beginning or ending
            base = rng.choice([p for p in prompts[-50:] if isinstance(p, str)] or ["x"])
            cut = rng.randint(40, 60)
            tail = " ".join(rng.choices(words, k=rng.randint(1, 6)))
            prompts.append(base[:cut] + tail if rng.random() < 0.5 else tail + base[-cut:])
        elif r < 0.24:
            prompts.append(rng.choice([None, "", "  ", "\n", "\u3000", "\x1f"]))
        elif r < 0.28:
            prompts.append(rng.choice(["naïve ", "🐱 ", "x\u00a0y "]) + " ".join(rng.choices(words, k=5)))
        else:
            text = " ".join(rng.choices(words, k=rng.randint(1, 25)))
            prompts.append(rng.choice(["", " ", "  ", "\t"]) + text + rng.choice(["", " ", "\n"]))
    out, counts = filter_report(frame(prompts))
    expected = reference_filter(prompts)
    assert out["id"].to_list() == expected
    assert out["prompt"].to_list() == [prompts[i].strip() for i in expected]
    assert sum(counts.values()) == len(prompts)
    assert counts["kept"] == len(expected)
    assert min(counts.values()) > 0  # every rule fired on this input


# ---- split -------------------------------------------------------------------------------------------

PROMPTS = [f"prompt number {i}, highly detailed" for i in range(30000)]


def test_split_is_deterministic_and_independent_of_order_and_other_rows():
    a = assign_split(pl.DataFrame({"prompt": PROMPTS}))
    b = assign_split(pl.DataFrame({"prompt": PROMPTS[::-1]}))
    c = assign_split(pl.DataFrame({"prompt": PROMPTS[:1000]}))  # a subset (as if parts were added later)
    mapping = dict(zip(a["prompt"], a["split"]))
    assert dict(zip(b["prompt"], b["split"])) == mapping
    assert all(mapping[p] == s for p, s in zip(c["prompt"], c["split"]))
    assert assign_split(pl.DataFrame({"prompt": PROMPTS}))["split"].to_list() == a["split"].to_list()


def test_split_uses_stripped_text_and_a_prompt_is_in_one_split():
    f = pl.DataFrame({"prompt": ["  same prompt ", "same prompt", "same prompt\n"] + PROMPTS[:200]})
    out = assign_split(f)
    assert out["split"][0] == out["split"][1] == out["split"][2]
    assert out.group_by("prompt").agg(pl.col("split").n_unique())["split"].max() == 1
    assert set(out["split"].unique()) <= {"train", "val", "test"}


def test_split_ratios_and_seed():
    a = assign_split(pl.DataFrame({"prompt": PROMPTS}))
    counts = dict(a["split"].value_counts().iter_rows())
    n = len(PROMPTS)
    assert abs(counts["train"] / n - 670 / 730) < 0.01
    for name in ("val", "test"):  # expected 1233, binomial sd ~34
        assert abs(counts[name] - n * 30 / 730) < 150
    moved = (assign_split(pl.DataFrame({"prompt": PROMPTS}), seed=1)["split"] != a["split"]).sum()
    assert moved > 1000
    halves = dict(assign_split(pl.DataFrame({"prompt": PROMPTS}), ratios=(1, 1, 0))["split"].value_counts().iter_rows())
    assert "test" not in halves and abs(halves["train"] - n / 2) < 500
    with pytest.raises(ValueError):
        assign_split(pl.DataFrame({"prompt": PROMPTS}), ratios=(1, 2))
    with pytest.raises(ValueError):
        assign_split(pl.DataFrame({"prompt": ["a", None]}))


def test_stable_hash_is_pinned():
    # blake2b-64 of b"0\0" + text, little-endian: pinned so a library upgrade can never move a pair
    values = stable_hash64(pl.Series(["a red cat", "café"]), seed=0)
    assert values.dtype == np.uint64
    import hashlib

    for text, value in zip(["a red cat", "café"], values):
        assert int(value) == int.from_bytes(hashlib.blake2b(b"0\x00" + text.encode(), digest_size=8).digest(), "little")
    assert int(values[0]) == 5877126177704283952  # a literal, so a change of definition fails here
