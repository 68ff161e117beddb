"""`reverse-sd scan`: the prompts (and seed, steps, CFG, sampler, size) that generators wrote into images.

Reads PNG, JPEG and WebP files below the paths (pipeline.inputs: regular files only, folders recursive, globs,
bounded walk) with pipeline.image_metadata (sd-parsers, bounded extraction, sidecars).  Nothing heavy is
imported (no torch, no Dagster).  Table output escapes control characters (pipeline.text_safety.printable);
JSON Lines stay exact.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections import Counter

from cli.parsing import add_paths_command
from pipeline.text_safety import printable

SCAN_HELP = "read the prompts that generators wrote into images"
SCAN_DESCRIPTION = (
    "Read the generation metadata of images (PNG, JPEG, WebP; folders recursively): generator,\n"
    "prompt, negative prompt, seed, steps, CFG, sampler, size. Nothing is trained or loaded."
)
SCAN_EPILOG = """\
output formats (default: table on a terminal, jsonl otherwise, e.g. into a pipe or a file):
  jsonl   one JSON object per file: path, generator, prompt, negative_prompt, seed, steps, cfg, sampler,
          width, height, skipped (null, or why no prompt was taken); a ComfyUI graph adds samplers (each
          sampler's id, seed, steps, cfg, sampler, prompt, negative_prompt). Values are exact.
  table   the same for reading: one line per file, then its prompt and negative prompt; control
          characters of prompts and file names escaped (as \\x1b)

What is read: the AUTOMATIC1111 / Forge / SD.Next "parameters" text (PNG text chunk, or JPEG / WebP EXIF
UserComment), ComfyUI's prompt / workflow graphs (with several samplers: the distinct positive prompts in
sampler node order, joined with ", "), InvokeAI (invokeai_metadata, sd-metadata, Dream), NovelAI, Fooocus.
A sidecar NAME.json ({"prompt": ...}) or NAME.txt beside NAME.png wins when present.
Metadata over 2 MB a text (8 MB in all), broken JSON, or a file that is not a PNG, JPEG or WebP gives a
record with its reason in "skipped". Folders and globs are walked as predict walks them (regular files only,
symlink loops visited once, at most 32 folders deep and 1,000,000 files).

exit status: 0 every file was read (some may hold no prompt: see skipped); 1 some paths could not be
read at all (not a regular file, over 100 MB, an argument that matched nothing); 2 a usage error.

examples:
  reverse-sd scan outputs/                          what each image holds, as a table
  reverse-sd scan outputs/ --format jsonl > prompts.jsonl
  reverse-sd scan "outputs/**/*.png" | jq -r 'select(.skipped == null) | .prompt'
"""


def add_scan_parser(sub, formatter_class) -> None:
    scan = add_paths_command(
        sub, "scan", formatter_class, help=SCAN_HELP, description=SCAN_DESCRIPTION, epilog=SCAN_EPILOG
    )
    scan.add_argument(
        "--format",
        choices=["table", "jsonl"],
        default=None,
        help="output format (default: table on a terminal, jsonl otherwise)",
    )
    scan.add_argument("--quiet", action="store_true", help="no summary line on standard error")
    scan.set_defaults(func=scan_command)


def _table_lines(record: dict) -> list[str]:
    path = printable(record["path"])
    if record["skipped"]:
        return [f"{path}  skipped: {printable(record['skipped'])}"]
    details = [f"[{printable(record['generator'])}]"]
    for name in ("seed", "steps", "cfg", "sampler"):
        if record.get(name) is not None:
            details.append(f"{name} {printable(record[name])}")
    if record.get("width"):
        details.append(f"{record['width']}x{record['height']}")
    lines = [f"{path}  {'  '.join(details)}", f"  prompt:    {printable(record['prompt'])}"]
    if record.get("negative_prompt"):
        lines.append(f"  negative:  {printable(record['negative_prompt'])}")
    if len(record.get("samplers") or []) > 1:
        for sampler in record["samplers"]:
            lines.append(
                f"  sampler {printable(sampler['id'])}: {printable(sampler.get('sampler'))}  "
                f"prompt: {printable(sampler.get('prompt'))}"
            )
    return lines


def scan_command(args: argparse.Namespace) -> int:
    from pipeline.image_metadata import FIELDS, read_image_metadata
    from pipeline.inputs import scan_inputs

    table = args.format == "table" or (args.format is None and sys.stdout.isatty())
    started = time.perf_counter()
    found = scan_inputs(args.paths)
    if not found.files and not found.skipped:
        print(f"error: no image files found in {printable(' '.join(args.paths))}", file=sys.stderr)
        return 2
    counts: Counter = Counter()
    with_prompt = 0

    def emit(record: dict) -> None:
        if table:
            sys.stdout.write("\n".join(_table_lines(record)) + "\n")
        else:
            sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()

    try:
        for path, reason in found.skipped:  # refused unread: a record too, so that the output names every path
            emit({"path": str(path), **dict.fromkeys(FIELDS[1:-1]), "skipped": reason})
        for path in found.files:
            record = read_image_metadata(path).as_dict()
            if record["skipped"] is None:
                with_prompt += 1
                counts[record["generator"]] += 1
            emit(record)
    except BrokenPipeError:  # the reader went away (| head): stop quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    elapsed = time.perf_counter() - started
    if not args.quiet:
        total = len(found.files)
        by = ", ".join(f"{printable(name)} {n}" for name, n in counts.most_common())
        rate = f", {total / elapsed:,.0f} files/s" if elapsed > 0 and total else ""
        refused = f"; {len(found.skipped)} paths not read" if found.skipped else ""
        print(
            f"{total} files read in {elapsed:.2f} s{rate}: {with_prompt} with a prompt"
            + (f" ({by})" if by else "")
            + f", {total - with_prompt} without{refused}",
            file=sys.stderr,
        )
    return 1 if found.skipped else 0
