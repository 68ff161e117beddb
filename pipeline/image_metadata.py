"""The prompt (and seed, steps, CFG, sampler) that a Stable Diffusion generator wrote into an image file.

``read_image_metadata(path)`` -> ``ImageMetadata``: path, generator, prompt, negative_prompt, seed, steps,
cfg, sampler, width, height, skipped (None, or the reason no prompt was taken), samplers (every sampler of a
ComfyUI graph).  Never raises for a bad file: a hostile or broken one is a record with ``skipped`` set.

Who does what
-------------
Parsing is sd-parsers' (PyPI ``sd-parsers``, MIT, Pillow only): its AUTOMATIC1111 / Forge / SD.Next
(``parameters``), ComfyUI (``prompt`` + ``workflow``), InvokeAI (``invokeai_metadata``, ``sd-metadata``,
``Dream``), NovelAI (``Description`` + ``Comment`` + ``Source``) and Fooocus (``parameters`` JSON) parsers
are called on the metadata this module extracts, in sd-parsers' own order (``MANAGED_PARSERS``).

Our own code, where sd-parsers falls short:

- **Extraction, bounded.**  sd-parsers hands a Pillow image to its extractors: Pillow reads a PNG ``tEXt``
  chunk of any size into memory, ``Image.text`` decodes every pixel to reach chunks after the image data,
  and a WebP's EXIF is read whole.  Here the PNG chunks, the JPEG segments and the WebP RIFF chunks are
  walked by their length fields (image data is seeked over, never read): a text chunk over MAX_TEXT_BYTES
  (raw or inflated, zlib output capped) or metadata over MAX_METADATA_BYTES in all skips the image with a
  reason, and no more than MAX_CHUNKS chunks are looked at (pipeline/image_chunks.py).  Width and height come from the header (IHDR,
  SOFn, VP8/VP8L/VP8X), not from the metadata.
- **EXIF UserComment.**  sd-parsers decodes it as UTF-16 big-endian only; here the character-code prefix is
  honoured (``ASCII``, ``UNICODE`` in either byte order, undefined as UTF-8).
- **ComfyUI without a workflow.**  sd-parsers follows the ``workflow`` JSON's links; an API-format save (a
  ``prompt`` chunk alone, or a broken ``workflow``) gets links rebuilt from the prompt's own node inputs.
  A graph over MAX_COMFY_NODES nodes is skipped with a reason (the parser walks the graph once per sampler).
- **ComfyUI with several samplers or prompts** (sd-parsers keeps them as a list; we choose):
  ``prompt`` is the distinct positive prompt texts of all samplers, samplers ordered by node id (numeric),
  joined with ", " (sd-parsers' ``full_prompt`` rule); ``negative_prompt`` likewise; seed, steps, cfg and
  sampler are the first sampler's; ``samplers`` lists every sampler (id, name, seed, steps, cfg, prompt,
  negative_prompt).
- **A ``parameters`` text without a settings line** (a prompt alone, as some tools write it): the text up
  to "Negative prompt:" is the prompt.  Fooocus's A1111-style text ("Version: Fooocus ...") is labelled
  Fooocus.
- **Sidecars**, the kohya / dataset convention, which sd-parsers does not read and which win when present:
  ``NAME.json`` (an object with "prompt", or "caption" / "text"; optional negative_prompt, seed, steps, cfg,
  sampler) or else ``NAME.txt`` (A1111 ``parameters`` text when it parses as such, else the whole text is
  the prompt), beside ``NAME.png``; at most MAX_SIDECAR_BYTES.  A sidecar's record has generator
  "sidecar" (or "sidecar (AUTOMATIC1111)"), and the image's own metadata is not read.
- **Hostile text.**  Every parser call is guarded (a parser error, a RecursionError of deep JSON, anything
  else: skipped with the reason, never a traceback); an A1111 text with many ``Hashes:`` fields (which
  sd-parsers' regular expression scans in quadratic time) is refused; prompts over MAX_PROMPT_CHARS are
  cut as DiffusionDB's are (pipeline.data.diffusiondb.cap_prompt).

Values are kept exact (control characters included): a terminal printer escapes them
(pipeline.text_safety.printable).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.diffusiondb import MAX_PROMPT_CHARS, cap_prompt
from pipeline.image_chunks import MetadataError, extract
from pipeline.inputs import InputError

# What scan reads: the formats generators write metadata into.
METADATA_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
# One metadata text (a PNG text chunk, inflated; an EXIF block; a sidecar): far above any real one (an
# A1111 text is a few kB, a large ComfyUI workflow a few hundred kB), far below what would hurt.
MAX_SIDECAR_BYTES = 1024 * 1024
MAX_COMFY_NODES = 2000
MAX_HASHES_FIELDS = 8  # "Hashes:" fields in one A1111 text
MAX_NAME_CHARS = 256  # a sampler's name

FIELDS = (
    "path",
    "generator",
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "cfg",
    "sampler",
    "width",
    "height",
    "skipped",
)

NO_PROMPT = "no prompt metadata"


@dataclass
class ImageMetadata:
    path: str
    generator: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    cfg: float | None = None
    sampler: str | None = None
    width: int | None = None
    height: int | None = None
    skipped: str | None = None
    samplers: list[dict] = field(default_factory=list)  # ComfyUI: every sampler (see the module docstring)

    def as_dict(self) -> dict:
        record = asdict(self)
        if not record["samplers"]:
            del record["samplers"]
        return record


# ---- parsing: sd-parsers, then our fallbacks ----------------------------------------------------------


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and 0 < len(value.strip()) <= 40:
        with contextlib.suppress(ValueError):
            return int(value.strip())
        with contextlib.suppress(ValueError):
            number = float(value.strip())
            return int(number) if number.is_integer() else None
    return None


def _float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str) and 0 < len(value.strip()) <= 40:
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if number == number and abs(number) != float("inf") else None


def _name(value: Any) -> str | None:
    return value[:MAX_NAME_CHARS] if isinstance(value, str) and value else None


def _text(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    value = value.strip()
    if not value:
        return None
    return cap_prompt(value) if len(value) > MAX_PROMPT_CHARS else value


def _first(mapping: dict, *keys: str) -> Any:
    for key in keys:
        if key in mapping and mapping[key] not in (None, ""):
            return mapping[key]
    return None


def _node_order(sampler) -> tuple:
    node = str(sampler.sampler_id or "")
    return (0, int(node), node) if node.isdigit() else (1, 0, node)


def _joined(texts) -> str | None:
    seen = list(dict.fromkeys(t.value.strip() for t in texts if isinstance(t.value, str) and t.value.strip()))
    return _text(", ".join(seen)) if seen else None


def _fill_from_prompt_info(record: ImageMetadata, info) -> None:
    """seed, steps, cfg, sampler, prompts from an sd-parsers PromptInfo (see the module docstring for
    several samplers)."""
    samplers = sorted(info.samplers, key=_node_order)
    generator = info.generator.value if hasattr(info.generator, "value") else str(info.generator)
    record.generator = generator
    record.prompt = _joined([p for s in samplers for p in s.prompts])
    record.negative_prompt = _joined([p for s in samplers for p in s.negative_prompts])
    metadata = info.metadata if isinstance(info.metadata, dict) else {}

    def settings(sampler) -> dict:
        params = sampler.parameters if isinstance(sampler.parameters, dict) else {}
        return {
            "seed": _int(_first(params, "seed", "noise_seed") or _first(metadata, "seed")),
            "steps": _int(_first(params, "steps") or _first(metadata, "steps")),
            "cfg": _float(_first(params, "cfg_scale", "cfg", "scale") or _first(metadata, "cfg_scale", "scale")),
            "sampler": _name(sampler.name if sampler.name != "unknown" else None),
        }

    if samplers:
        first = settings(samplers[0])
        record.seed, record.steps, record.cfg, record.sampler = (
            first["seed"],
            first["steps"],
            first["cfg"],
            first["sampler"],
        )
    if generator == "ComfyUI":
        record.samplers = [
            {
                "id": str(s.sampler_id),
                **settings(s),
                "prompt": _joined(s.prompts),
                "negative_prompt": _joined(s.negative_prompts),
            }
            for s in samplers
        ]
    version = metadata.get("Version") or metadata.get("version")
    if generator == "AUTOMATIC1111" and isinstance(version, str) and version.startswith("Fooocus"):
        record.generator = "Fooocus"


def _parsers() -> list:
    from sd_parsers.parsers import MANAGED_PARSERS

    return [parser() for parser in MANAGED_PARSERS]


_PARSERS: list | None = None


def _comfy_links(prompt: dict) -> dict:
    """A ComfyUI API-format prompt's links as a workflow's ``links`` list: [id, from, slot, to, slot, type],
    the type being the input's name in capitals (so that CLIP links are told apart, as the parser wants)."""
    links = []
    for target, node in prompt.items():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict):
            continue
        for name, value in inputs.items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int)):
                links.append([len(links), str(value[0]), value[1], str(target), 0, str(name).upper()])
    return {"links": links}


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise MetadataError(f"{what} is JSON nested too deep") from None
    except ValueError as exc:
        raise MetadataError(f"broken JSON in {what} ({str(exc)[:80]})") from None


def _comfy_parameters(texts: dict[str, str]) -> dict | None:
    """{"prompt": dict, "workflow": dict} for sd-parsers' ComfyUI parser, or None when this is not ComfyUI."""
    if "prompt" not in texts:
        return None
    prompt = _json(texts["prompt"], "the ComfyUI prompt")
    if not isinstance(prompt, dict):
        raise MetadataError("the ComfyUI prompt is not a JSON object")
    if len(prompt) > MAX_COMFY_NODES:
        raise MetadataError(f"a ComfyUI graph of {len(prompt):,} nodes, above the {MAX_COMFY_NODES:,} limit")
    workflow = None
    if "workflow" in texts:
        with contextlib.suppress(MetadataError):
            workflow = _json(texts["workflow"], "the ComfyUI workflow")
    if not (isinstance(workflow, dict) and isinstance(workflow.get("links"), list)):
        workflow = _comfy_links(prompt)
    elif len(workflow["links"]) > 20 * MAX_COMFY_NODES:
        raise MetadataError(f"a ComfyUI workflow of {len(workflow['links']):,} links")
    return {"prompt": prompt, "workflow": workflow}


def _a1111_fallback(text: str) -> tuple[str | None, str | None]:
    """(prompt, negative prompt) of a ``parameters`` text without a settings line."""
    prompt, _, negative = text.partition("Negative prompt:")
    return _text(prompt), _text(negative)


def _parse_texts(record: ImageMetadata, texts: dict[str, str]) -> None:
    """Fill ``record`` from the extracted texts, or set ``skipped``."""
    from sd_parsers.data import Generators

    global _PARSERS
    if _PARSERS is None:
        _PARSERS = _parsers()
    candidates = dict(texts)
    if "prompt" in texts:  # parsed here, bounded, so the parser gets objects
        comfy = _comfy_parameters(texts)
        if comfy is not None:
            candidates.update(comfy)
    parameters = texts.get("parameters")
    if parameters is not None and parameters.count("Hashes:") > MAX_HASHES_FIELDS:
        raise MetadataError(f"a parameters text with {parameters.count('Hashes:'):,} 'Hashes:' fields")
    errors = []
    for parser in _PARSERS:
        if parser.generator == Generators.COMFYUI and "workflow" not in candidates:
            continue
        try:
            info = parser.parse(candidates)
        except RecursionError:
            errors.append(f"{parser.generator.value}: nested too deep")
            continue
        except Exception as exc:  # ParserError, and whatever hostile input makes a parser raise
            errors.append(f"{parser.generator.value}: {exc}")
            continue
        _fill_from_prompt_info(record, info)
        if record.prompt:
            return
    if parameters is not None and not parameters.lstrip().startswith("{"):
        record.generator = "AUTOMATIC1111"
        record.prompt, record.negative_prompt = _a1111_fallback(parameters)
        if record.prompt:
            return
    if "prompt" in candidates and isinstance(candidates.get("prompt"), dict):
        record.generator = "ComfyUI"
        record.skipped = "a ComfyUI graph without a text prompt feeding a sampler"
        return
    record.generator = None
    if errors and set(texts) & _KNOWN_KEYS:
        record.skipped = f"unreadable prompt metadata ({errors[0][:120]})"
    else:
        record.skipped = NO_PROMPT


_KNOWN_KEYS = {"parameters", "prompt", "workflow", "invokeai_metadata", "sd-metadata", "Dream", "Comment"}


# ---- sidecars ------------------------------------------------------------------------------------------


def sidecar_path(image: Path) -> Path | None:
    """NAME.json, else NAME.txt, beside the image (a regular file), or None."""
    for suffix in (".json", ".txt"):
        candidate = image.with_suffix(suffix)
        with contextlib.suppress(OSError):
            if candidate.is_file():
                return candidate
    return None


def _read_sidecar(path: Path) -> str:
    from pipeline.inputs import read_input_file

    try:
        data = read_input_file(path, MAX_SIDECAR_BYTES)
    except InputError as exc:
        raise MetadataError(f"sidecar {path.name}: {exc}") from None
    return data.decode("utf-8", errors="replace")


def _parse_sidecar(record: ImageMetadata, path: Path) -> None:
    text = _read_sidecar(path)
    if path.suffix == ".json":
        data = _json(text, f"sidecar {path.name}")
        if not isinstance(data, dict):
            raise MetadataError(f"sidecar {path.name} is not a JSON object")
        record.generator = "sidecar"
        record.prompt = _text(_first(data, "prompt", "caption", "text", "positive_prompt"))
        record.negative_prompt = _text(_first(data, "negative_prompt", "negative", "uc"))
        record.seed = _int(data.get("seed"))
        record.steps = _int(data.get("steps"))
        record.cfg = _float(_first(data, "cfg", "cfg_scale", "guidance_scale", "scale"))
        record.sampler = _name(_first(data, "sampler", "sampler_name"))
    else:
        probe = ImageMetadata(path=record.path)
        with contextlib.suppress(MetadataError):
            _parse_texts(probe, {"parameters": text})
        if probe.generator == "AUTOMATIC1111" and probe.seed is not None:
            for name in ("prompt", "negative_prompt", "seed", "steps", "cfg", "sampler"):
                setattr(record, name, getattr(probe, name))
            record.generator = "sidecar (AUTOMATIC1111)"
        else:
            record.generator = "sidecar"
            record.prompt = _text(text)
    if not record.prompt:
        record.skipped = f"sidecar {path.name} holds no prompt"


# ---- the entry point -------------------------------------------------------------------------------------


def read_image_metadata(path: str | os.PathLike) -> ImageMetadata:
    """The generation metadata of one image (see the module docstring); never raises for a bad file."""
    path = Path(path)
    record = ImageMetadata(path=str(path))
    try:
        sidecar = sidecar_path(path)
        try:
            (record.width, record.height), texts = extract(path)
        except MetadataError:
            if sidecar is None:
                raise
            texts = None  # the sidecar wins: the image's own metadata is not needed
        if sidecar is not None:
            _parse_sidecar(record, sidecar)
        else:
            _parse_texts(record, texts.items)
    except (MetadataError, InputError) as exc:
        record.skipped = str(exc)
    except OSError as exc:
        record.skipped = f"cannot read: {exc.strerror or type(exc).__name__}"
    except (struct.error, ValueError, UnicodeError) as exc:
        record.skipped = f"broken metadata ({type(exc).__name__})"
    except RecursionError:
        record.skipped = "metadata nested too deep"
    if record.skipped:
        record.prompt = record.negative_prompt = None
    return record
