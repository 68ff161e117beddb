"""bench/bad_inputs: the DiffusionDB reader over a corpus of hostile parts, with the figures that matter.

Builds, in a temporary directory, a local mirror in DiffusionDB's layout with one part per case (each
holding good records next to its bad input), then does what the diffusiondb_parts asset does for every
part: list it, fetch it, read_part, write the frame as Parquet under a storage root.  Prints:

- cases: how many hostile parts, and how many of them fail loudly as a whole (CorruptArchiveError naming the
  part: an unreadable archive or JSON, where no prompt of the part is known);
- good records lost: good records of the parts that were read which are missing or altered (goal 0);
- crashes: any exception other than CorruptArchiveError (goal 0);
- files written outside the storage root: the temporary tree (mirror, cwd, escape targets) listed before
  and after, plus the absolute escape targets (goal 0).

    .venv/bin/python bench/bad_inputs.py
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import struct
import sys
import tempfile
import time
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from options import bench_parser  # noqa: E402

from pipeline.data.diffusiondb import CorruptArchiveError, DiffusionDBSource, read_part  # noqa: E402
from pipeline.storage import read_parquet, write_parquet  # noqa: E402


# -- building blocks ---------------------------------------------------------------------------------
def png(seed: int, size=(40, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(*size[::-1], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG whose header declares width x height pixels, with a tiny body."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def print_cases(kind: str, rows: list[tuple[str, str, str, bool]]) -> int:
    """The table of (case, expected, observed, as expected) rows; 1 when any case was unexpected."""
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    print()
    print(f"{'case':<{widths[0]}}  {'expected':<{widths[1]}}  observed")
    for name, expected, observed, ok in rows:
        print(f"{name:<{widths[0]}}  {expected:<{widths[1]}}  {observed}{'' if ok else '   <-- UNEXPECTED'}")
    bad = sum(1 for r in rows if not r[3])
    print(f"{kind} cases: {len(rows)}, unexpected: {bad} (goal 0)")
    return 1 if bad else 0


def symlink(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def entry(prompt, seed=1) -> dict:
    return {"p": prompt, "se": seed, "c": 7.0, "st": 50, "sa": "k_euler"}


@dataclass
class Built:
    """What a case's archive holds: the good records (id -> prompt) and whether the whole part must fail."""

    good: dict[str, str]
    must_fail: bool = False
    held: int = 0  # good records inside a part that must fail as a whole (lost loudly, never silently)


@dataclass
class Case:
    name: str
    build: Callable[[Path, str, Path], Built]  # (zip path, part key, temporary base) -> Built


def standard(extra_members, extra_entries, also_good: dict[str, str] | None = None, n_good: int = 2) -> Callable:
    """A part with n_good good records plus the given members / entries (bad ones, or good ones in also_good)."""

    def build(path: Path, part: str, base: Path) -> Built:
        good = {f"good-{i}.png": f"a good prompt number {i}" for i in range(n_good)}
        entries = {name: entry(prompt, i) for i, (name, prompt) in enumerate(good.items())}
        members = [(name, png(zlib.crc32(name.encode()))) for name in good]
        good.update(also_good or {})
        extra_e = extra_entries(base) if callable(extra_entries) else extra_entries
        extra_m = extra_members(base) if callable(extra_members) else extra_members
        entries.update(extra_e)
        members += extra_m
        with zipfile.ZipFile(path, "w") as zf:
            for info, data in members:
                zf.writestr(info, data)
            zf.writestr(f"{part}.json", json.dumps(entries))
        return Built(good)

    return build


def whole(builder: Callable[[Path, str], None], held: int = 0) -> Callable:
    """A case whose whole archive (or JSON) is unreadable: the part must fail loudly."""

    def build(path: Path, part: str, base: Path) -> Built:
        builder(path, part)
        return Built({}, must_fail=True, held=held)

    return build


def good_zip_bytes(part: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("good-0.png", png(1))
        zf.writestr(f"{part}.json", json.dumps({"good-0.png": entry("a good prompt")}))
    return buf.getvalue()


def write(data: Callable[[str], bytes]) -> Callable[[Path, str], None]:
    return lambda path, part: path.write_bytes(data(part))


def json_case(raw: Callable[[str], bytes]) -> Callable[[Path, str], None]:
    def builder(path: Path, part: str) -> None:
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("good-0.png", png(2))
            zf.writestr(f"{part}.json", raw(part))

    return builder


def bad_utf8_member_name(path: Path, part: str) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a\u00e9.png", png(3))
        zf.writestr(f"{part}.json", json.dumps({"a\u00e9.png": entry("x")}))
    path.write_bytes(path.read_bytes().replace("a\u00e9.png".encode(), b"a\xff\xfe.png"))


def corrupt_crc(path: Path, part: str, base: Path) -> Built:
    victim = png(77, (60, 60))
    standard([("crc.png", victim)], {"crc.png": entry("bad crc")})(path, part, base)
    raw = bytearray(path.read_bytes())
    raw[raw.find(victim) + 50] ^= 0xFF  # stored uncompressed: a flipped byte fails the CRC
    path.write_bytes(bytes(raw))
    return Built({f"good-{i}.png": f"a good prompt number {i}" for i in range(2)})


def raw_json(extra: bytes, members: list[str], also_good: dict[str, str] | None = None) -> Callable:
    """Two good records plus raw JSON bytes for the extra entries (bytes no json.dumps would write)."""

    def build(path: Path, part: str, base: Path) -> Built:
        good = {f"good-{i}.png": f"a good prompt number {i}" for i in range(2)}
        head = json.dumps({name: entry(prompt, i) for i, (name, prompt) in enumerate(good.items())}).encode()
        with zipfile.ZipFile(path, "w") as zf:
            for name in [*good, *members]:
                zf.writestr(name, png(zlib.crc32(name.encode())))
            zf.writestr(f"{part}.json", head[:-1] + b", " + extra + b"}")
        return Built({**good, **(also_good or {})})

    return build


def corpus() -> list[Case]:
    escape = "escaped-by-bench.png"
    return [
        # whole archives that cannot be read
        Case("truncated archive", whole(write(lambda part: good_zip_bytes(part)[:-40]), held=1)),
        Case(
            "archive cut in half",
            whole(write(lambda part: good_zip_bytes(part)[: len(good_zip_bytes(part)) // 2]), held=1),
        ),
        Case("random bytes", whole(write(lambda part: np.random.default_rng(0).bytes(20_000)))),
        Case("zero-byte archive", whole(write(lambda part: b""))),
        Case("zip magic then garbage", whole(write(lambda part: b"PK\x03\x04" + np.random.default_rng(1).bytes(5000)))),
        Case("member name not UTF-8", whole(bad_utf8_member_name, held=1)),
        # JSON that cannot be parsed
        Case("JSON missing", whole(lambda path, part: zipfile.ZipFile(path, "w").close())),
        Case("JSON not JSON", whole(json_case(lambda part: b"{this is not json"))),
        Case("JSON is a list", whole(json_case(lambda part: b"[1, 2, 3]"))),
        Case("JSON UTF-16", whole(json_case(lambda part: '{"good-0.png": {"p": "x"}}'.encode("utf-16")))),
        Case(
            "JSON nested 100000 deep", whole(json_case(lambda part: b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"))
        ),
        # members that leave their folder or are links
        Case(
            "member ../ climbs out", standard(lambda b: [(f"../../{escape}", png(5))], {f"../../{escape}": entry("x")})
        ),
        Case("member sub/../../ climbs out", standard([("sub/../../x.png", png(6))], {"sub/../../x.png": entry("x")})),
        Case("member backslash climbs out", standard([("..\\..\\x.png", png(7))], {"..\\..\\x.png": entry("x")})),
        Case(
            "member absolute path",
            standard(
                lambda b: [(str(b / "outside" / escape), png(8))], lambda b: {str(b / "outside" / escape): entry("x")}
            ),
        ),
        Case("member drive path", standard([("C:/x.png", png(9))], {"C:/x.png": entry("x")})),
        Case("member symlink", standard([(symlink("link.png"), b"/etc/passwd")], {"link.png": entry("x")})),
        Case(
            "member symlink dir then file",
            standard([(symlink("dir"), b"/tmp"), ("dir/x.png", png(10))], {"dir": entry("x")}),
        ),
        Case("duplicate member", standard([("good-0.png", png(11))], {})),
        # entries and images that do not pair up
        Case("entries without images", standard([], {f"ghost-{i}.png": entry("ghost") for i in range(3)})),
        Case("images without entries", standard([(f"orphan-{i}.png", png(20 + i)) for i in range(3)], {})),
        Case("entry not an object", standard([("list.png", png(12))], {"list.png": ["not", "an", "object"]})),
        Case("prompt not text", standard([("num.png", png(13))], {"num.png": entry(12345)})),
        Case("JSON: a Latin-1 byte in one prompt", raw_json(b'"l1.png": {"p": "caf\xe9"}', ["l1.png"])),
        Case("JSON: a key that is not UTF-8", raw_json(b'"\xff.png": {"p": "x"}', [])),
        Case("JSON: an escaped lone surrogate", raw_json(b'"s.png": {"p": "\\ud800"}', ["s.png"])),
        Case(
            "JSON: a 5000-digit seed",
            raw_json(b'"n.png": {"p": "fine", "se": ' + b"9" * 5000 + b"}", ["n.png"], {"n.png": "fine"}),
        ),
        Case(
            "JSON: raw control characters in a prompt",
            raw_json(
                b'"c.png": {"p": "tab\there\nline \x07\x1b[31m"}', ["c.png"], {"c.png": "tab\there\nline \x07\x1b[31m"}
            ),
        ),
        Case(
            "prompts with control characters",
            standard(
                [("ctrl.png", png(14))],
                {"ctrl.png": entry("ansi \x1b[2J nul \x00 bell \x07 cr \r")},
                also_good={"ctrl.png": "ansi \x1b[2J nul \x00 bell \x07 cr \r"},
            ),
        ),
        # images
        Case("zero-byte image", standard([("zero.png", b"")], {"zero.png": entry("x")})),
        Case(
            "random-byte image", standard([("rand.png", np.random.default_rng(3).bytes(500))], {"rand.png": entry("x")})
        ),
        Case("truncated image", standard([("trunc.png", png(15, (200, 200))[:300])], {"trunc.png": entry("x")})),
        Case("bad CRC member", corrupt_crc),
        Case("PNG bomb 100000x100000", standard([("bomb.png", bomb_png(100_000, 100_000))], {"bomb.png": entry("x")})),
        Case("PNG bomb 7000x7000", standard([("bomb.png", bomb_png(7_000, 7_000))], {"bomb.png": entry("x")})),
        Case("PNG declaring 0x10", standard([("empty.png", bomb_png(0, 10))], {"empty.png": entry("x")})),
        Case(
            "format outside the allow-list (PPM)",
            standard([("ppm.png", _encoded("PPM"))], {"ppm.png": entry("x")}),
        ),
        Case(
            "EPS (would run Ghostscript)",
            standard([("eps.png", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")], {"eps.png": entry("x")}),
        ),
    ]


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, format=fmt)
    return buf.getvalue()


def listing(base: Path, exclude: Path) -> set[str]:
    return {str(p) for p in base.rglob("*") if exclude not in p.parents and p != exclude}


def settings_hostile_cases() -> int:
    """Wrong settings (issues 27 and 29): each runs `reverse-sd materialize` in a process of its own; prints
    case, expected, observed.  Every one must exit 2 at start with one line naming the setting."""
    import subprocess

    project = Path(__file__).resolve().parents[1]
    rows: list[tuple[str, str, str, bool]] = []
    with tempfile.TemporaryDirectory(prefix="bad-settings-") as tmp:
        base = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("REVERSE_SD_", "HF_"))}
        env.update(REVERSE_SD_HOME=str(base / "home"), DAGSTER_HOME=str(base / "dagster_home"), HF_HUB_OFFLINE="1")
        cases = [  # name, environment, arguments, the word the one line must hold
            ("cron 'a b c d e'", {"REVERSE_SD_OBSERVE_CRON": "a b c d e"}, [], "REVERSE_SD_OBSERVE_CRON"),
            ("cron '99 99 99 99 99'", {"REVERSE_SD_OBSERVE_CRON": "99 99 99 99 99"}, [], "REVERSE_SD_OBSERVE_CRON"),
            ("hub id offline", {"REVERSE_SD_DIFFUSIONDB": "not/a-real-repo"}, [], "REVERSE_SD_DIFFUSIONDB"),
            ("REVERSE_SD_HOME=foo://bar", {"REVERSE_SD_HOME": "foo://bar"}, [], "REVERSE_SD_HOME"),
            ("REVERSE_SD_HOME=memory://", {"REVERSE_SD_HOME": "memory://bucket/home"}, [], "REVERSE_SD_HOME"),
            ("VIT_LR=1e308", {"REVERSE_SD_TRAIN_VIT_LR": "1e308"}, [], "REVERSE_SD_TRAIN_VIT_LR"),
            ("VIT_LR=1e30", {"REVERSE_SD_TRAIN_VIT_LR": "1e30"}, [], "REVERSE_SD_TRAIN_VIT_LR"),
            (
                "SAMPLE_IMAGES_PER_PART=10^12",
                {"REVERSE_SD_SAMPLE_IMAGES_PER_PART": str(10**12)},
                [],
                "REVERSE_SD_SAMPLE_IMAGES_PER_PART",
            ),
            ("LOADER_WORKERS=9999", {"REVERSE_SD_LOADER_WORKERS": "9999"}, [], "REVERSE_SD_LOADER_WORKERS"),
            ("--workers 99999999999", {}, ["--workers", "99999999999"], "--workers"),
        ]
        for name, changes, args, word in cases:
            started = time.perf_counter()
            r = subprocess.run(
                [sys.executable, "-m", "cli.main", "materialize", *args],
                cwd=project,
                env={**env, **changes},
                capture_output=True,
                text=True,
                timeout=600,
            )
            seconds = time.perf_counter() - started
            # argparse's usage lines come before its one error line
            lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
            ok = r.returncode == 2 and len(lines) == 1 and word in lines[0] and "Traceback" not in r.stderr
            rows.append(
                (name, "exit 2, one line naming it", f"exit {r.returncode}, {len(lines)} line(s), {seconds:.1f} s", ok)
            )
        home = base / "dry" / "home"  # a dry run on a fresh root writes nothing there
        r = subprocess.run(
            [sys.executable, "-m", "cli.main", "materialize", "--dry-run"],
            cwd=project,
            env={**env, "REVERSE_SD_HOME": str(home)},
            capture_output=True,
            text=True,
            timeout=600,
        )
        written = sorted(str(p.relative_to(home)) for p in home.rglob("*")) if home.exists() else []
        rows.append(
            (
                "materialize --dry-run, fresh root",
                "exit 0, nothing written under the root",
                f"exit {r.returncode}, {'root not created' if not home.exists() else f'{len(written)} path(s) written'}",
                r.returncode == 0 and not written,
            )
        )

    return print_cases("settings", rows)


def main() -> int:
    warnings.simplefilter("ignore", UserWarning)  # zipfile warns when the duplicate-member case is built
    cases = corpus()
    with tempfile.TemporaryDirectory(prefix="bad-inputs-") as tmp:
        base = Path(tmp)
        mirror, home, cwd = base / "mirror", base / "storage", base / "cwd"
        for d in (mirror / "images", home, cwd, base / "outside"):
            d.mkdir(parents=True)
        built: dict[str, tuple[Case, Built]] = {}
        for i, case in enumerate(cases, start=1):
            part = f"part-{i:06d}"
            built[part] = (case, case.build(mirror / "images" / f"{part}.zip", part, base))
        escape_targets = [base / "escaped-by-bench.png", base.parent / "escaped-by-bench.png", Path("/x.png")]
        existed = {str(p) for p in escape_targets if p.exists()}
        before = listing(base, home)
        old_cwd = os.getcwd()
        os.chdir(cwd)  # anything written relative to the cwd shows up in the listing
        started = time.perf_counter()
        source = DiffusionDBSource(str(mirror))
        rows = []
        reasons: Counter = Counter()
        try:
            for part in source.list_parts():
                case, expect = built[part]
                outcome, lost, kept, skipped = "read", 0, 0, 0
                try:
                    result = read_part(source.fetch_part(part), part, image_size=64)
                    target = home / "diffusiondb_parts" / f"{part}.parquet"
                    write_parquet(result.frame, target)
                    stored = read_parquet(target)
                    have = dict(zip(stored["image_id"].to_list(), stored["prompt"].to_list()))
                    lost = sum(1 for image_id, prompt in expect.good.items() if have.get(image_id) != prompt)
                    kept, skipped = stored.height, len(result.skipped)
                    reasons.update(result.counts)
                    if expect.must_fail:
                        outcome = "read, expected to fail"
                except CorruptArchiveError:
                    outcome = "failed loudly" if expect.must_fail else "failed loudly, UNEXPECTED"
                    lost = len(expect.good)
                except Exception as exc:  # noqa: BLE001 - a crash is what this bench counts
                    outcome = f"CRASH {type(exc).__name__}: {exc}"[:100]
                    lost = len(expect.good)
                rows.append((case.name, outcome, len(expect.good), kept, skipped, lost))
        finally:
            os.chdir(old_cwd)
        elapsed = time.perf_counter() - started
        outside = sorted(listing(base, home) - before)
        outside += [str(p) for p in escape_targets if p.exists() and str(p) not in existed]

    width = max(len(r[0]) for r in rows)
    print(f"{'case':<{width}}  {'outcome':<24} {'good':>4} {'kept':>4} {'skipped':>7} {'lost':>4}")
    for name, outcome, good, kept, skipped, lost in rows:
        print(f"{name:<{width}}  {outcome:<24} {good:>4} {kept:>4} {skipped:>7} {lost:>4}")
    crashes = sum(1 for r in rows if r[1].startswith("CRASH"))
    unexpected = sum(1 for r in rows if "UNEXPECTED" in r[1] or "expected to fail" in r[1])
    failed = sum(1 for r in rows if r[1].startswith("failed loudly"))
    held = sum(built_case.held for _, built_case in built.values())
    print()
    print(f"cases: {len(rows)} hostile parts ({failed} fail loudly as a whole, {len(rows) - failed} read)")
    print(f"bad records skipped and counted: {sum(reasons.values())} ({dict(sorted(reasons.items()))})")
    lost = sum(r[5] for r in rows if r[1] != "failed loudly")
    print(f"good records lost: {lost} of {sum(r[2] for r in rows)} (goal 0)")
    print(f"good records inside parts that fail loudly (named in the error, never silently dropped): {held}")
    print(f"crashes (exceptions other than CorruptArchiveError): {crashes} (goal 0); unexpected outcomes: {unexpected}")
    print(f"files written outside the storage root: {len(outside)} (goal 0) {outside[:5] if outside else ''}")
    print(f"read in {elapsed:.2f} s")
    return 0 if not (crashes or unexpected or outside or lost) else 1


# -- reverse-sd predict against hostile paths, outputs and arguments (issue 27 items 1, 7, 8, 12; issue 29) ---
def _predict_home(home: Path) -> None:
    """A storage root predict can use: one tiny vit with a vocabulary head, a vocabulary, a prompt bank whose
    prompts carry terminal escapes, and the CLIP twin."""
    import polars as pl

    from pipeline.models import create_model
    from pipeline.training.checkpoint import save_checkpoint
    from pipeline.zero_shot import save_tiny_clip, twin_directory

    words = ["red", "blue", "circle", "square", "painting", "photo"]
    save_checkpoint(home / "trained_models" / "vit" / "mlc", create_model("vit", variant="tiny", vocab_size=len(words)))
    bank = np.random.default_rng(0).normal(size=(3, 384)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    prompts = ["title \x1b]0;pwned\x07", "clear \x1b[2J", "over\rwritten"]
    pl.DataFrame({"prompt": prompts, "embedding": bank}).write_parquet(home / "prompt_bank.parquet")
    pl.DataFrame({"index": np.arange(len(words), dtype=np.int32), "word": words}).write_parquet(
        home / "vocabulary.parquet"
    )
    save_tiny_clip(twin_directory(str(home)))


def predict_hostile_cases() -> int:
    """Each case runs `reverse-sd predict` in a process of its own; prints case, expected, observed."""
    import signal
    import socket
    import subprocess

    project = Path(__file__).resolve().parents[1]
    rows: list[tuple[str, str, str, bool]] = []
    with tempfile.TemporaryDirectory(prefix="bad-predict-") as tmp:
        base = Path(tmp)
        home = base / "home"
        home.mkdir()
        _predict_home(home)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("REVERSE_SD_", "HF_"))}
        env.update(REVERSE_SD_HOME=str(home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_HOME=str(base / "hf"))
        image = base / "in" / "red.png"
        image.parent.mkdir()
        image.write_bytes(png(1))

        def run(*args: str, env_extra=None, timeout=120) -> tuple[int | str, str, str, float]:
            started = time.perf_counter()
            try:
                r = subprocess.run(
                    [sys.executable, "-m", "cli.main", "predict", *args],
                    cwd=project,
                    env={**env, **(env_extra or {})},
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                )
            except subprocess.TimeoutExpired:
                return "timeout", "", "", time.perf_counter() - started
            return r.returncode, r.stdout, r.stderr, time.perf_counter() - started

        def errors(err: str) -> list[str]:
            return [line for line in err.splitlines() if not line.startswith("note: ")]

        def case(name: str, expected: str, observed: str, ok: bool) -> None:
            rows.append((name, expected, observed, ok))

        # --output
        full = base / "full"
        try:
            os.mknod(full, 0o666 | stat.S_IFCHR, os.makedev(1, 7))  # a private /dev/full
        except OSError:
            full = None
        if full is not None:
            code, _, err, _ = run(str(image), "--model", "vit", "--output", str(full))
            still = stat.S_ISCHR(os.lstat(full).st_mode)
            case(
                "--output a full device",
                "exit 2, one line, still a device",
                f"exit {code}, {len(errors(err))} line(s), {'a device' if still else 'REPLACED by a file'}",
                code == 2 and len(errors(err)) == 1 and still,
            )
        real = base / "real.jsonl"
        real.write_text("old\n")
        link = base / "link.jsonl"
        link.symlink_to(real)
        code, _, err, _ = run(str(image), "--model", "vit", "--output", str(link))
        ok = link.is_symlink() and real.read_text().startswith("{")
        case(
            "--output a symlink",
            "the link kept, its target written",
            "as expected" if ok else f"exit {code}; link {'kept' if link.is_symlink() else 'replaced'}",
            code == 0 and ok,
        )
        code, out, _, _ = run(str(image), "--model", "vit", "--output", "-", "--quiet")
        ok = out.startswith("{") and not (project / "-").exists()
        case("--output -", "records on standard output", "as expected" if ok else f"exit {code}", code == 0 and ok)
        many = base / "many"
        many.mkdir()
        for i in range(300):
            (many / f"{i:03d}.png").write_bytes(png(1))
        target = base / "out" / "p.jsonl"
        target.parent.mkdir()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cli.main",
                "predict",
                str(many),
                "--model",
                "vit",
                "--batch-size",
                "1",
                "--output",
                str(target),
            ],
            cwd=project,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while not list(target.parent.glob(".*.tmp")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        left = [p.name for p in target.parent.iterdir()]
        case(
            "SIGTERM during --output",
            "exit 143, nothing left beside the target",
            f"exit {proc.returncode}, left {left}",
            proc.returncode == 143 and not left,
        )
        # paths and table output
        odd = base / "odd"
        odd.mkdir()
        (odd / "a[1].png").write_bytes(png(2))
        (odd / "x\x1b[31m\nname.png").write_bytes(png(3))
        code, out, err, _ = run(str(odd / "a[1].png"), "--model", "vit", "--quiet")
        case(
            "a file named a[1].png",
            "read as it is",
            f"exit {code}, {len(out.splitlines())} record(s)",
            code == 0 and len(out.splitlines()) == 1,
        )
        code, out, err, _ = run(str(odd), "--model", "vit", "--format", "table", "--quiet")
        raw = sorted({f"{ord(c):#x}" for c in out + err if ord(c) < 32 and c != "\n" or 0x7F <= ord(c) <= 0x9F})
        case(
            "table: ESC/BEL/CR in prompts, newline in a file name",
            "no raw control character",
            f"raw {', '.join(raw)}" if raw else "none raw",
            code == 0 and not raw,
        )
        loop = base / "loop"
        loop.mkdir()
        (loop / "one.png").write_bytes(png(4))
        (loop / "l1").symlink_to(".")
        (loop / "l2").symlink_to(".")
        code, out, _, seconds = run(str(loop / "**" / "*.png"), "--model", "vit", timeout=60)
        case(
            "'d/**/*.png' with two self-links",
            "ends, 1 record",
            f"exit {code}, {len(out.splitlines())} record(s), {seconds:.1f} s",
            code == 0 and len(out.splitlines()) == 1,
        )
        code, _, err, _ = run(str(image), str(base / "*.jpg"), "--model", "vit")
        case(
            "a glob that matches nothing",
            "named, exit 1",
            f"exit {code}, {'named' if 'matches no file' in err else 'silent'}",
            code == 1 and "matches no file" in err,
        )
        gifs = base / "gifs"
        gifs.mkdir()
        frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
        frames[0].save(gifs / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
        code, out, _, _ = run(str(gifs), "--model", "vit")
        case(
            "an animated GIF in a folder",
            "its first frame predicted",
            f"exit {code}, {len(out.splitlines())} record(s)",
            code == 0 and len(out.splitlines()) == 1,
        )
        # arguments
        code, _, err, seconds = run(str(image), "--model", "nosuch")
        case(
            "--model nosuch",
            "exit 2, one line, before the heavy imports",
            f"exit {code}, {len(errors(err))} line(s), {seconds:.2f} s",
            code == 2 and len(errors(err)) == 1,
        )
        code, _, err, seconds = run(str(image), "--batch-size", "100000")
        case(
            "--batch-size 100000",
            "refused: usage + one error line (cap 256)",
            f"exit {code}, {len(errors(err))} line(s), {seconds:.2f} s",
            code == 2 and "cap of 256" in err,
        )
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        code, _, err, seconds = run(
            str(image),
            "--zero-shot",
            "--clip",
            "nosuch/model",
            timeout=300,
            env_extra={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{port}"},
        )
        retries = err.count("Retrying")
        case(
            "--zero-shot --clip nosuch/model, no hub",
            "exit 2 at once, one line, no retries",
            f"exit {code}, {len(errors(err))} line(s), {retries} retries, {seconds:.1f} s",
            code == 2 and len(errors(err)) == 1 and not retries,
        )
        from pipeline.zero_shot import twin_directory

        cut = base / "cut_clip"
        shutil.copytree(twin_directory(str(home)), cut)
        data = (cut / "model.safetensors").read_bytes()
        (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
        code, _, err, _ = run(str(image), "--zero-shot", "--clip", str(cut))
        case(
            "--clip DIR, truncated safetensors",
            "exit 2, one line",
            f"exit {code}, {len(errors(err))} line(s)",
            code == 2 and len(errors(err)) == 1 and "Traceback" not in err,
        )
        pickled = base / "pickle_clip"
        shutil.copytree(twin_directory(str(home)), pickled)
        (pickled / "model.safetensors").unlink()
        (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle: never loaded
        code, _, err, _ = run(str(image), "--zero-shot", "--clip", str(pickled))
        case(
            "--clip DIR, pickle-only checkpoint",
            "exit 2, one line, never unpickled",
            f"exit {code}, {len(errors(err))} line(s)",
            code == 2 and len(errors(err)) == 1 and "pickle" in err,
        )

    return print_cases("predict", rows)


# -- damaged artifacts, damaged checkpoints, a moved root (issue 27 items 2, 3, 4) ------------------------------
def artifact_hostile_cases() -> int:
    """What `materialize --stale` and training resume see after damage; prints case, expected, observed."""
    import dagster as dg
    import polars as pl

    from assets.artifacts import under_root
    from pipeline import storage
    from pipeline.models import create_model
    from pipeline.training.checkpoint import save_checkpoint
    from pipeline.training.resume import newest_usable

    rows: list[tuple[str, str, str, bool]] = []
    with tempfile.TemporaryDirectory(prefix="bad-artifacts-") as tmp:
        base = Path(tmp)
        target = base / "root" / "prompt_bank.parquet"
        write_parquet(pl.DataFrame({"prompt": [f"prompt {i}" for i in range(1000)]}), target)
        before = target.stat()
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one byte flipped, size kept
        target.write_bytes(bytes(data))
        os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the modification time kept
        cheap_before = storage.is_intact(target)
        try:
            read_parquet(target)
            refused = "read"
        except storage.IntegrityError:
            refused = "refused"
        cheap_after = storage.is_intact(target)
        rows.append(
            (
                "artifact: byte flipped, size and mtime kept",
                "reader refuses; then --stale's check sees it",
                f"{refused}; check before {'intact' if cheap_before else 'damaged'}, "
                f"after {'intact' if cheap_after else 'damaged'}",
                refused == "refused" and not cheap_after,
            )
        )

        folder = base / "trained_models" / "vit" / "baseline"
        model = create_model("vit", variant="tiny", vocab_size=0)
        for step in (1, 2):
            save_checkpoint(folder, model, progress={"step": step}, index=step)
        newest = sorted(folder.rglob("*.safetensors"))[-1]
        with open(newest, "r+b") as handle:
            handle.seek(newest.stat().st_size // 2)
            handle.write(b"\0" * 64)
        usable, passed = newest_usable(folder)
        chosen = usable.path.name if usable is not None else "none"
        rows.append(
            (
                "checkpoint: the latest damaged",
                "resume from the newest intact one, naming the one passed over",
                f"resumes from {chosen}, {len(passed)} passed over",
                usable is not None and Path(str(usable.path)) != newest and len(passed) == 1,
            )
        )

        key = dg.AssetKey("prompt_bank")
        moved = under_root("/old/root/prompt_bank.parquet", key, str(base / "new"))
        rows.append(
            (
                "root moved: artifact recorded at the old root",
                "checked at the new root",
                str(moved).replace(str(base), "<tmp>"),
                moved == str(base / "new" / "prompt_bank.parquet"),
            )
        )
        foreign = under_root("/elsewhere/bank.parquet", key, str(base / "new"))
        rows.append(("root replaced: another root's file", "not trusted (rebuilt here)", str(foreign), foreign is None))
    return print_cases("artifacts", rows)


if __name__ == "__main__":
    bench_parser(__doc__).parse_args()  # no options; --help explains the bench
    sys.exit(max(main(), predict_hostile_cases(), settings_hostile_cases(), artifact_hostile_cases()))
