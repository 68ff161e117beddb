"""bench/filter: pipeline.data.filtering.filter_prompts (Polars) versus vectorised pandas implementations of the
same rules (pandas string methods + duplicated(), both with pandas 3's default Arrow-backed "str" dtype and
with classic object dtype), on N DiffusionDB-like prompts.  Asserts identical kept rows (same ids, same
order); prints best-of-R seconds, the ratio, and each contender's peak memory, measured in a fresh child
process from /proc/self/status so Arrow / Rust allocations count too: "peak RSS" = VmHWM while filtering
(high-water mark reset after loading the data), "growth" = that peak minus the RSS after loading.  "first
run" is each contender's first call in its fresh process: for Polars it includes importing numba and
loading the first-occurrence kernel from numba's on-disk cache (or compiling it, on a new machine).

    .venv/bin/python bench/filter.py [--n 2000000] [--repeat 5]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from options import INTERNAL, add_options, bench_parser

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pipeline.data.filtering import NEAR_DUPLICATE_CHARS, WHITESPACE  # noqa: E402

SUBJECTS = (
    "portrait of a woman|a cat|a dragon|a castle on a hill|a futuristic city|an enchanted forest|a knight in armor|"
    "a giant robot|a mountain landscape|an ocean at sunset|a cyberpunk street|a steampunk airship|an astronaut|"
    "a wizard casting a spell|a cozy cabin in the woods|a samurai|a bowl of fruit|a lighthouse in a storm"
).split("|")
MODIFIERS = (
    "highly detailed|digital painting|artstation|concept art|smooth|sharp focus|illustration|octane render|"
    "unreal engine|cinematic lighting|intricate|elegant|volumetric fog|matte painting|golden hour|studio ghibli|"
    "photorealistic|8k|4k|hdr|trending on artstation|dramatic lighting|fantasy|symmetrical|ultra realistic|"
    "by greg rutkowski|by alphonse mucha|by artgerm|by wlop|by james jean|by beeple|by makoto shinkai"
).split("|")
NON_ASCII = ("café", "—", "“quoted”", "✨", "🐱", "東京", "naïve", "Ørsted", "·")


def _pseudo_words(rng: np.random.Generator, count: int) -> np.ndarray:
    """`count` distinct-ish lower-case pseudo-words (2-4 syllables): the long tail of a prompt vocabulary."""
    syllables = np.array("ka lo mi ra ne to su va zen dor el ith an or um ba gri fal mor quin tes".split())
    parts = rng.integers(len(syllables), size=(count, 4))
    lengths = rng.integers(2, 5, size=count)
    return np.array(["".join(syllables[parts[i, : lengths[i]]]) for i in range(count)])


def make_prompts(n: int, seed: int = 0):
    """A Polars frame (id, prompt) of n DiffusionDB-like prompts, deterministic from `seed`, vectorised.

    Proportions chosen to land near DiffusionDB 2M (1.5M unique prompts, ~730k pairs after the paper's
    filter): ~25% exact duplicates of an earlier prompt (users render one prompt many times, sometimes with
    different surrounding whitespace), ~25% edits of an earlier prompt's ending (shared 50-char prefix),
    ~12% edits of its beginning (shared suffix), ~20% ending in one of 300 common long style tails, ~1.2%
    null / empty / whitespace-only, ~4% with a non-ASCII character, ~6% surrounding whitespace; lengths
    about 10-300 characters.
    """
    import polars as pl
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    vocab = np.concatenate([np.array(SUBJECTS + MODIFIERS), _pseudo_words(rng, 5000)])
    zipf = 1.0 / np.arange(1, len(vocab) + 1) ** 0.9
    zipf /= zipf.sum()

    def phrases(count: int, lo: int, hi: int, sep: str = " ") -> pl.Series:
        """`count` phrases of lo..hi-1 Zipf-distributed words, built as Arrow lists (no per-row Python)."""
        lengths = rng.integers(lo, hi, size=count)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        words = pl.Series(vocab).gather(rng.choice(len(vocab), size=int(offsets[-1]), p=zipf)).to_arrow()
        return pl.Series(pa.LargeListArray.from_arrays(pa.array(offsets), words)).list.join(sep)

    subject = pl.Series(np.array(SUBJECTS)[rng.integers(len(SUBJECTS), size=n)])
    body = phrases(n, 1, 30, sep=", ")
    tails = phrases(300, 8, 14, sep=", ")  # common long style tails ("..., by greg rutkowski, 8k, ...")
    fresh = pl.DataFrame({"s": subject, "b": body}).select(pl.concat_str("s", "b", separator=", "))["s"]
    with_tail = rng.random(n) < 0.2
    fresh = pl.select(
        pl.when(pl.Series(with_tail))
        .then(pl.concat_str(fresh, tails.gather(rng.integers(300, size=n)), separator=", "))
        .otherwise(fresh)
        .str.slice(0, 300)
    ).to_series()

    earlier = (rng.random(n) * np.arange(n)).astype(np.int64)  # a uniformly random earlier row
    kind = rng.random(n)
    cut = pl.Series(rng.integers(NEAR_DUPLICATE_CHARS, NEAR_DUPLICATE_CHARS + 40, size=n))
    new_bit = phrases(n, 2, 8)
    src = fresh.gather(earlier)
    text = pl.select(
        pl.when(pl.Series(kind < 0.25))  # keep an earlier prompt's beginning, change its ending
        .then(pl.concat_str(src.str.slice(0, cut), new_bit, separator=", "))
        .when(pl.Series(kind < 0.37))  # change its beginning, keep its ending
        .then(pl.concat_str(new_bit, src.str.slice(-cut), separator=" "))
        .otherwise(fresh)
    ).to_series()

    origin = np.arange(n)
    duplicate = rng.random(n) < 0.25
    origin[duplicate] = earlier[duplicate]
    while not np.array_equal(origin, origin[origin]):  # resolve duplicates of duplicates
        origin = origin[origin]
    text = text.gather(origin)

    noise = rng.random(n)
    pad = pl.Series(np.array([" ", "  ", "\n", "\t", " \n"])[rng.integers(5, size=n)])
    odd = pl.Series(np.array(NON_ASCII)[rng.integers(len(NON_ASCII), size=n)])
    prompt = pl.select(
        pl.when(pl.Series(noise < 0.002))
        .then(pl.lit(None, dtype=pl.String))
        .when(pl.Series(noise < 0.007))
        .then(pl.lit(""))
        .when(pl.Series(noise < 0.012))
        .then(pad)
        .when(pl.Series(noise < 0.052))
        .then(pl.concat_str(text, odd, separator=" "))
        .when(pl.Series(noise < 0.112))
        .then(pl.concat_str(pad, text, pad))
        .otherwise(text)
    ).to_series()
    return pl.DataFrame({"id": np.arange(n, dtype=np.int64), "prompt": prompt})


def polars_filter(path: str):
    import polars as pl

    from pipeline.data.filtering import filter_prompts

    frame = pl.read_parquet(path)

    def run():
        started = time.perf_counter()
        kept = filter_prompts(frame)
        return time.perf_counter() - started, kept["id"].to_numpy()

    return run


def pandas_filter(path: str, dtype: str):
    """The same rules with pandas string methods and duplicated(), the idiomatic way: strip, drop empty,
    drop non-ASCII, drop_duplicates-like pass on the first 50 characters, then on the last 50."""
    import pandas as pd

    frame = pd.read_parquet(path)
    frame["prompt"] = frame["prompt"].astype(object if dtype == "object" else "str")

    def run():
        started = time.perf_counter()
        p = frame["prompt"].str.strip(WHITESPACE)
        keep = (p.str.len() > 0).fillna(False).astype(bool)
        keep &= p.str.isascii().fillna(False).astype(bool)
        kept = frame.assign(prompt=p)[keep]
        kept = kept[~kept["prompt"].str.slice(0, NEAR_DUPLICATE_CHARS).duplicated()]
        kept = kept[~kept["prompt"].str.slice(-NEAR_DUPLICATE_CHARS).duplicated()]
        return time.perf_counter() - started, kept["id"].to_numpy()

    return run


CONTENDERS = {
    "polars": polars_filter,
    "pandas-str": lambda path: pandas_filter(path, "str"),
    "pandas-object": lambda path: pandas_filter(path, "object"),
}


def _status_mb(field: str) -> float:
    """VmRSS / VmHWM of this process from /proc (per address space, so exec resets it, unlike ru_maxrss,
    which Linux carries over from the parent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(which: str, path: str, repeat: int, out: str) -> None:
    run = CONTENDERS[which](path)
    rss_loaded = _status_mb("VmRSS")
    try:  # reset the high-water mark to the current RSS, so VmHWM is the filter's own peak
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    times, ids = [], None
    for _ in range(repeat):
        seconds, ids = run()
        times.append(seconds)
    peak = _status_mb("VmHWM")
    np.save(out + ".npy", ids)
    with open(out + ".json", "w") as f:
        json.dump(
            {"seconds": min(times), "first": times[0], "all": times, "peak_mb": peak, "growth_mb": peak - rss_loaded}, f
        )


def main() -> None:
    parser = add_options(
        bench_parser(__doc__),
        n=(2_000_000, "DiffusionDB-like prompts (DiffusionDB 2M's size)"),
        repeat=(5, "timed calls per contender, the best kept"),
        seed=(0, "seed of the generated prompts"),
        child=(None, INTERNAL),
        data=(None, INTERNAL),
        out=(None, INTERNAL),
    )
    args = parser.parse_args()
    if args.child:
        child(args.child, args.data, args.repeat, args.out)
        return
    from pipeline.data.filtering import filter_report

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "prompts.parquet")
        started = time.perf_counter()
        frame = make_prompts(args.n, args.seed)
        frame.write_parquet(data)
        print(f"generated {args.n:,} prompts in {time.perf_counter() - started:.1f} s", flush=True)
        counts = filter_report(frame)[1]
        unique = frame["prompt"].str.strip_chars(WHITESPACE).n_unique()
        del frame
        print(f"distinct stripped prompts: {unique:,}; removed per rule: {counts}", flush=True)
        for which in CONTENDERS:
            out = os.path.join(tmp, which)
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    which,
                    "--data",
                    data,
                    "--repeat",
                    str(args.repeat),
                    "--out",
                    out,
                ],
                check=True,
            )
            with open(out + ".json") as f:
                results[which] = json.load(f)
            results[which]["ids"] = np.load(out + ".npy")
    reference = results["polars"]["ids"]
    same = {which: np.array_equal(r["ids"], reference) for which, r in results.items()}
    base = results["polars"]["seconds"]
    print(
        f"\n{args.n:,} prompts, {len(reference):,} kept; best of {args.repeat} runs; {os.cpu_count()} CPU cores (shared)"
    )
    print(
        f"{'contender':<15}{'seconds':>9}{'x polars':>10}{'first run':>11}{'peak RSS MB':>13}{'growth MB':>11}{'same rows':>11}"
    )
    for which, r in results.items():
        print(
            f"{which:<15}{r['seconds']:>9.3f}{r['seconds'] / base:>10.1f}{r['first']:>11.3f}"
            f"{r['peak_mb']:>13.0f}{r['growth_mb']:>11.0f}{str(same[which]):>11}"
        )
    print(
        f"goal: polars under 0.5 s for 2M ({base:.3f} s) and >= 20x faster than pandas "
        f"(str: {results['pandas-str']['seconds'] / base:.1f}x, object: {results['pandas-object']['seconds'] / base:.1f}x)"
    )
    if not all(same.values()):
        sys.exit("kept rows differ")


if __name__ == "__main__":
    main()
