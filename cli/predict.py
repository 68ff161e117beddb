"""`reverse-sd predict`: images in, prompts (and vocabulary words, captions, embeddings) out; zero-shot from a CLIP.

Every argument is checked before the heavy imports (torch, transformers), so a wrong one is answered in about
a second.  --output replaces a regular file atomically and writes a device, FIFO or ``-`` in place; SIGTERM
and Ctrl-C leave no temporary file behind.  Table output and every message escape control characters
(pipeline.text_safety.printable); JSON, JSON Lines and CSV stay exact.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import stat
import sys
from pathlib import Path

from pipeline.text_safety import printable


class _UsageError(Exception):
    """A wrong argument, found before anything heavy is imported; printed as one line."""


class Terminated(BaseException):
    """SIGTERM (or SIGHUP) arrived: unwinds like KeyboardInterrupt, so every ``finally`` runs (no temporary
    --output file is left), and no ``except Exception`` on the way swallows it."""


def _terminate(signum, frame):
    raise Terminated(signum)


def _check_model(name: str) -> None:
    """--model is auto, ensemble or a registered backbone; anything else (a typo, a path) fails at start.
    The names come from pipeline.constants (the registry's, without importing torch)."""
    from pipeline.constants import BACKBONE_NAMES

    valid = ["auto", "ensemble", *sorted(BACKBONE_NAMES)]
    if name not in valid:
        raise _UsageError(f"--model {name!r} is not a model; use one of: {', '.join(valid)}")


def _check_captioner(name: str | None) -> None:
    """--captioner is auto or a registered captioner."""
    if name is None:
        return
    from pipeline.captioning import CAPTIONERS

    valid = ["auto", *CAPTIONERS.names()]
    if name not in valid:
        raise _UsageError(f"--captioner {name!r} is not a captioner; use one of: {', '.join(valid)}")


def _check_arguments(args: argparse.Namespace) -> None:
    """Everything about the arguments that needs neither the settings nor a model."""
    _check_model(args.model)
    if not args.zero_shot:
        if args.clip is not None:
            raise _UsageError("--clip chooses the model of --zero-shot; add --zero-shot")
    else:
        if args.model != "auto":
            raise _UsageError("--model chooses a trained model; --zero-shot ranks with --clip instead")
        if args.generate or args.captioner is not None:
            raise _UsageError("--generate needs a trained captioner; not with --zero-shot")
    if args.output not in (None, "-") and os.path.isdir(args.output):
        raise _UsageError(f"--output {args.output} is a directory, not a file")


TOY_MODELS_NOTE = (
    "note: these are toy models trained on synthetic images (sample profile: tiny random-init backbones); "
    "their prompts say little about real Stable Diffusion images. REVERSE_SD_PROFILE=diffusiondb trains the real ones."
)


ZERO_SHOT_TWIN_NOTE = (
    "note: zero-shot with the sample profile's tiny random-init CLIP twin: its ranking exercises the code path "
    "and means nothing. --clip openai/clip-vit-large-patch14 (with HF_HUB_OFFLINE=0) ranks with the real CLIP."
)


def _zero_shot_clip(args: argparse.Namespace, settings) -> str | None:
    """The CLIP model --zero-shot ranks with (None without --zero-shot): --clip, else the profile's default
    (sample: the tiny CLIP twin saved under the storage root; otherwise openai/clip-vit-large-patch14)."""
    if not args.zero_shot:
        return None
    if args.clip is not None:
        return args.clip
    from pipeline.zero_shot import DEFAULT_CLIP, twin_directory
    from resources.settings import local_dir

    return twin_directory(local_dir(settings.home, "")) if settings.is_sample else DEFAULT_CLIP


def _check_bank(home: str, zero_shot: bool) -> None:
    """The prompt bank is there (a local path: one stat, nothing imported), else what to materialize."""
    path = f"{home.rstrip('/')}/prompt_bank.parquet"
    if "://" in home:
        from pipeline import storage

        found = storage.exists(path)
    else:
        found = os.path.exists(path)
    if found:
        return
    if zero_shot:
        from pipeline.zero_shot import BANK_HINT

        raise _UsageError(f"no prompt bank under {home}: {BANK_HINT}")
    raise _UsageError(f"no prompt bank under {home}: materialize the asset prompt_bank (make run)")


def _check_clip(clip: str) -> None:
    """--clip names weights that may be loaded (safetensors, whole) and can be had (a directory, the hub, or
    the cache when the hub cannot be reached): checked before torch and transformers are imported."""
    from huggingface_hub import constants

    from pipeline.clip_files import ModelFilesError, local_files_only

    try:
        local_files_only(clip, offline=bool(constants.HF_HUB_OFFLINE))
    except ModelFilesError as exc:
        raise _UsageError(str(exc)) from None


def _zero_shot_predictor(settings, clip: str, args: argparse.Namespace):
    """A ZeroShotRetriever over the storage root's prompt bank; the sample's CLIP twin is saved on first use."""
    from tqdm import tqdm

    from pipeline.zero_shot import ZeroShotRetriever, ensure_tiny_clip, load_bank, twin_directory
    from resources.settings import local_dir

    load_bank(settings.home)  # no bank: say so before building or loading any model
    if settings.is_sample and args.clip is None:
        ensure_tiny_clip(twin_directory(local_dir(settings.home, "")))
    bars = []

    def progress(total: int):
        bar = tqdm(
            total=total,
            unit="prompt",
            desc="encoding the prompt bank (once; cached)",
            file=sys.stderr,
            disable=args.quiet or not sys.stderr.isatty(),
        )
        bars.append(bar)
        return bar.update

    try:
        return ZeroShotRetriever(settings.home, clip, device=args.device, batch_size=args.batch_size, progress=progress)
    finally:
        for bar in bars:
            bar.close()


def _prediction_record(predictor, result, args, generate: bool) -> dict:
    """One image's JSON object (a line of jsonl, an element of json)."""
    record = {
        "path": str(result.path),
        "model": predictor.method,
        "prompts": [{"prompt": p, "cosine": round(c, 6)} for p, c in result.prompts],
    }
    if predictor.vocabulary is not None and args.words > 0:
        record["words"] = [{"word": w, "probability": round(q, 4)} for w, q in result.words]
    if generate:
        record["generated"] = result.generated
    if args.embeddings:
        record["embedding"] = [round(float(v), 7) for v in result.embedding]
    return record


@contextlib.contextmanager
def _output(name: str | None):
    """The stream predict writes to, and where to, as the "wrote" message names it (None: standard output).

    None or ``-``: standard output.  A symlink: its target (resolved; the link itself stays).  A device, a
    FIFO or a socket: opened and written in place, as a shell's ``>`` would (never replaced by a file).  A
    regular file or a new path: written to a hidden temporary beside it, flushed to disk, given the old
    file's permissions and renamed over it, so a reader sees the old output or the new one, whole; the
    temporary is removed on every way out (an error, Ctrl-C, SIGTERM).
    """
    if name is None or name == "-":
        yield sys.stdout, None
        return
    try:
        info = os.stat(name)  # after symlinks: /dev/stdout on a pipe is a FIFO, written in place
    except FileNotFoundError:
        info = None  # a new path, or a dangling symlink: its target is created
    if info is not None and not stat.S_ISREG(info.st_mode):
        with open(name, "w", encoding="utf-8", newline="") as out:
            yield out, name
        return
    target = Path(os.path.realpath(name)) if os.path.islink(name) else Path(name)
    import uuid

    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "x", encoding="utf-8", newline="") as out:
            yield out, name
            out.flush()
            os.fsync(out.fileno())
        if info is not None:
            os.chmod(tmp, stat.S_IMODE(info.st_mode))
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def predict_command(args: argparse.Namespace) -> int:
    """SIGTERM and SIGHUP stop predict as Ctrl-C does (every cleanup runs; exit status 143 / 129)."""
    if args.output is not None:
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
        try:
            for sig in previous:
                signal.signal(sig, _terminate)
        except ValueError:  # not the main thread: signals stay as they are
            previous = {}
    else:
        previous = {}
    try:
        return _predict(args)
    except _UsageError as exc:
        print(f"error: {printable(exc)}", file=sys.stderr)
        return 2
    except Terminated as exc:
        print("terminated", file=sys.stderr)
        return 128 + int(exc.args[0] if exc.args else signal.SIGTERM)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _predict(args: argparse.Namespace) -> int:
    # First every argument, the settings and the prompt bank, with nothing heavy imported.
    _check_arguments(args)
    from resources.settings import load_settings

    settings = load_settings()
    _check_captioner(args.captioner)
    clip = _zero_shot_clip(args, settings)
    _check_bank(settings.home, zero_shot=clip is not None)
    if clip is None or (args.clip is None and settings.is_sample) or os.path.isdir(clip):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # trained models and local CLIP directories need no hub
    if clip is not None and not (args.clip is None and settings.is_sample):
        _check_clip(clip)
    from pipeline.inputs import duplicate_stems, scan_inputs

    scan = scan_inputs(args.paths)  # only regular files within the size cap; the rest skipped with a reason
    files = scan.files
    if not files:
        for path, reason in scan.skipped:
            print(f"skipped {printable(path)}: {printable(reason)}", file=sys.stderr)
        refused = f" ({len(scan.skipped)} skipped)" if scan.skipped else ""
        print(f"error: no image files found in {printable(' '.join(args.paths))}{refused}", file=sys.stderr)
        return 2
    if args.format == "kaggle":
        shared = duplicate_stems(files)
        if shared:  # image ids are file stems: two files with one stem would write one id twice
            listed = "; ".join(f"{stem}: {', '.join(map(str, group))}" for stem, group in shared.items())
            raise _UsageError(f"--format kaggle takes image ids from file names, and these repeat: {listed}")

    # Now the models (torch, transformers ...).
    import csv
    import io
    import json

    from tqdm import tqdm

    from pipeline.predictor import NotTrainedError, PredictOptions, PromptPredictor

    # a submission holds embeddings only
    generate = (args.generate or args.captioner is not None) and args.format != "kaggle"
    try:
        if clip is not None:
            predictor = _zero_shot_predictor(settings, clip, args)
        else:
            predictor = PromptPredictor(
                settings.home,
                model=args.model,
                device=args.device,
                batch_size=args.batch_size,
                captioner=(args.captioner or "auto") if generate else None,
            )
    except (NotTrainedError, ValueError, OSError, RuntimeError) as exc:  # CheckpointError is a ValueError
        print(f"error: {printable(exc)}", file=sys.stderr)
        return 2
    if predictor.toy_models:  # the first line, before anything about the inputs
        print(ZERO_SHOT_TWIN_NOTE if clip is not None else TOY_MODELS_NOTE, file=sys.stderr)
    for path, reason in scan.skipped:
        print(f"skipped {printable(path)}: {printable(reason)}", file=sys.stderr)
    skipped = len(scan.skipped)
    total = len(files) + skipped
    words = args.words if args.format != "kaggle" else 0
    top_k = args.top_k if args.format != "kaggle" else 0

    def write(out) -> int:
        """Stream the predictions to ``out``; the number written."""
        nonlocal skipped
        written = 0
        records = []
        # the bar only on a terminal; what goes to the same terminal is written around it, never through it
        bar = tqdm(total=len(files), unit="image", file=sys.stderr, disable=args.quiet or not sys.stderr.isatty())

        def emit(text: str) -> None:
            if not bar.disable and out is sys.stdout and sys.stdout.isatty():
                bar.write(text, file=out, end="")
            else:
                out.write(text)
                if out is sys.stdout:
                    out.flush()  # a reader of a pipe sees each image as it is done

        try:
            if args.format == "kaggle":
                emit("imgId_eId,val\n")
            for result in predictor.predict(files, PredictOptions(top_k=top_k, words=words, generate=generate)):
                bar.update(1)
                if result.error is not None:
                    skipped += 1
                    bar.write(f"skipped {printable(result.path)}: {printable(result.error)}", file=sys.stderr)
                    continue
                written += 1
                if args.format == "kaggle":
                    rows = io.StringIO()
                    csv.writer(rows, lineterminator="\n").writerows(
                        [f"{result.path.stem}_{i}", f"{float(v):.6f}"] for i, v in enumerate(result.embedding)
                    )
                    emit(rows.getvalue())
                elif args.format == "table":  # for a terminal: every outside text escaped
                    lines = [f"{printable(result.path)}  [{printable(predictor.method)}]"]
                    lines += [
                        f"  {rank}. {score:.4f}  {printable(prompt)}"
                        for rank, (prompt, score) in enumerate(result.prompts, 1)
                    ]
                    if result.words:
                        lines.append("  words:  " + ", ".join(f"{printable(w)} {q:.2f}" for w, q in result.words))
                    if generate:
                        lines.append(f"  generated:  {printable(result.generated)}")
                    emit("\n".join(lines) + "\n")
                elif args.format == "json":
                    records.append(_prediction_record(predictor, result, args, generate))
                else:
                    emit(json.dumps(_prediction_record(predictor, result, args, generate)) + "\n")
        finally:
            bar.close()
        if args.format == "json":
            out.write(json.dumps(records, indent=2) + "\n")
        return written

    try:
        with _output(args.output) as (out, name):
            written = write(out)
            out.flush()
    except BrokenPipeError:  # standard output's reader went away (| head): stop quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:  # a full disk, /dev/full, no permission ...
        where = "standard output" if args.output in (None, "-") else f"--output {args.output}"
        print(f"error: cannot write {printable(where)}: {printable(exc.strerror or exc)}", file=sys.stderr)
        return 2
    if name is not None:
        print(f"wrote {written} predictions to {printable(name)}", file=sys.stderr)
    if skipped:
        print(
            f"{skipped} of {total} files skipped (not a regular file, too large, unreadable or not an image; "
            "or an argument that matched nothing)",
            file=sys.stderr,
        )
        return 1
    return 0
