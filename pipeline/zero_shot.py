"""Zero-shot prompt retrieval with a public CLIP model, before any training (as clip-interrogator does).

Every prompt of the prompt bank (the `prompt_bank` asset: training prompts and their SBERT embeddings, built
by the data stages alone) is embedded once by CLIP's text tower; an image is embedded by CLIP's image tower
and the bank is ranked by cosine (a matrix product of unit rows). The predicted SBERT embedding of an image
is its top-1 bank prompt's, which makes the retrieval comparable with the trained models (the report's
zero-shot baseline row) and gives `--embeddings` / `--format kaggle` something to write.

The model is loaded with transformers' ``CLIPModel`` / ``CLIPProcessor.from_pretrained``: a hub id
(``openai/clip-vit-large-patch14`` by default) or a local directory. The sample profile, offline, takes
the same code path on a tiny random-init CLIP twin saved as a local directory (``save_tiny_clip``).

The bank's text embeddings are cached under the storage root (``zero_shot/cache/<key>.npy``, written
atomically with a SHA-256 sidecar), keyed by the model's identity and the bank file's SHA-256: the
second run over the same bank and model skips the text tower entirely; a damaged cache is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from pipeline import storage as store
from pipeline.metrics import normalise_rows
from pipeline.predictor import DEFAULT_OPTIONS, Prediction, PredictOptions, predict_in_batches

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
ZERO_SHOT_DIR = "zero_shot"  # under the storage root: cache/ (bank text embeddings), tiny_clip/ (the twin)
TWIN_MARKER = "reverse_sd_tiny_clip.json"  # in a twin's directory: it is random-init, its ranking means nothing
TWIN_DESCRIPTION = "tiny random-init CLIP twin"
BANK_ASSET = "prompt_bank"
BANK_HINT = "run reverse-sd materialize --select '*prompt_bank' first (the data stages and the bank; no training)"


class ZeroShotError(RuntimeError):
    """Zero-shot retrieval cannot run (no prompt bank, a model that cannot be loaded); one line saying why."""


def _features(output) -> np.ndarray:
    """transformers 5 returns the projected features as an output's pooler_output; 4.x the tensor itself."""
    tensor = output.pooler_output if hasattr(output, "pooler_output") else output
    return tensor.float().cpu().numpy()


# -- the prompt bank -------------------------------------------------------------------------------------------
def bank_path(home: str) -> str:
    return f"{home.rstrip('/')}/{BANK_ASSET}.parquet"


def load_bank(home: str) -> tuple[list[str], np.ndarray, str]:
    """(prompts, their SBERT embeddings [n, 384], the bank file's SHA-256), or ZeroShotError naming what to run."""
    path = bank_path(home)
    if not store.exists(path):
        raise ZeroShotError(f"no prompt bank under {home}: {BANK_HINT}")
    try:
        sha = store.verify(path) or store.file_sha256(path)
    except store.IntegrityError as exc:
        raise ZeroShotError(f"{exc}: re-materialize the asset {BANK_ASSET} (reverse-sd materialize --stale)") from None
    bank = store.read_parquet(path, columns=["prompt", "embedding"])
    if bank.height == 0:
        raise ZeroShotError(f"the prompt bank {path} is empty: {BANK_HINT}")
    return bank["prompt"].to_list(), bank["embedding"].to_numpy().astype(np.float32), sha


# -- the model ---------------------------------------------------------------------------------------------------
def is_twin(model: str) -> bool:
    return os.path.isfile(os.path.join(model, TWIN_MARKER))


def describe(model: str) -> str:
    """How reports and predictions name a model: its hub id or directory, or the twin's description."""
    return TWIN_DESCRIPTION if is_twin(model) else model


def save_tiny_clip(directory: str | os.PathLike, seed: int = 0) -> str:
    """A tiny random-init CLIPModel (seeded) + CLIPProcessor saved with save_pretrained into ``directory``,
    atomically (a temporary sibling renamed into place): the offline twin of a hub CLIP, loaded by the same
    from_pretrained code. Its tokenizer is the BERT WordPiece of the offline all-MiniLM-L6-v2 package."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    from pipeline.captioning.tokenizer import minilm_tokenizer
    from pipeline.models.tiny_clip import TINY_CLIP, tiny_clip_model

    target = Path(directory)
    tokenizer = minilm_tokenizer()
    size = TINY_CLIP["vision"]["image_size"]
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer,
    )
    model = tiny_clip_model(tokenizer, seed)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    try:
        with _quiet_transformers():
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
        (tmp / TWIN_MARKER).write_text(json.dumps({"seed": seed, "description": TWIN_DESCRIPTION}))
        if target.exists():  # another process built it meanwhile: same seed, same weights; keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def twin_directory(local_root: str) -> str:
    """Where the sample profile keeps its CLIP twin: ``<local root>/zero_shot/tiny_clip``."""
    return os.path.join(local_root, ZERO_SHOT_DIR, "tiny_clip")


def ensure_tiny_clip(directory: str | os.PathLike, seed: int = 0) -> str:
    """The twin's directory, saved there first when it is not yet."""
    if not is_twin(str(directory)):
        save_tiny_clip(directory, seed)
    return str(directory)


class _quiet_transformers:
    """No transformers progress bars ("Loading weights") on the terminal while loading or saving."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._was = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        if self._was:
            hf_logging.enable_progress_bar()


def _hub_offline() -> bool:
    """Whether huggingface_hub runs offline (it reads HF_HUB_OFFLINE once, when first imported)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def load_clip(model: str, device: str = "cpu"):
    """(CLIPModel in eval mode on ``device``, CLIPProcessor) from a hub id or a local directory; ZeroShotError
    in one line when it cannot be loaded (offline and not cached, a wrong id, a directory without a model, a
    pickle-only or truncated checkpoint).

    Only safetensors weights are loaded.  A hub id is looked up with one request first: when the hub cannot
    be reached (or HF_HUB_OFFLINE is set) the local cache is used alone, so no download is retried for
    minutes; a model that is not cached then fails at once.
    """
    from pipeline.clip_files import ModelFilesError, local_files_only

    try:
        local_only = local_files_only(model, offline=_hub_offline())
    except ModelFilesError as exc:
        raise ZeroShotError(str(exc)) from None
    from transformers import CLIPModel, CLIPProcessor

    try:
        with _quiet_transformers():
            processor = CLIPProcessor.from_pretrained(model, local_files_only=local_only)
            clip = CLIPModel.from_pretrained(model, local_files_only=local_only, use_safetensors=True)
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, SafetensorError, RuntimeError ...: one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
        if os.path.isdir(model):
            hint = "the directory does not hold a CLIPModel + CLIPProcessor saved with save_pretrained"
        elif _hub_offline():
            hint = "HF_HUB_OFFLINE=1 and it is not in the local Hugging Face cache: set HF_HUB_OFFLINE=0 to download it"
        else:
            hint = "not a CLIP model with safetensors weights on the hub, or the hub cannot be reached"
        raise ZeroShotError(
            f"cannot load the CLIP model {model!r} ({hint}; --clip takes a local directory): {first}"
        ) from None
    return clip.to(device).eval(), processor


def model_key(model: str) -> str:
    """The cache's identity of a model: its hub id, or a local directory's path and files (size, mtime)."""
    if not os.path.isdir(model):
        return model
    files = sorted(p for p in Path(model).iterdir() if p.is_file())
    stamps = ",".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return f"{os.path.abspath(model)}|{stamps}"


def cache_path(home: str, model: str, bank_sha256: str) -> str:
    key = hashlib.sha256(f"{model_key(model)}\n{bank_sha256}".encode()).hexdigest()[:32]
    return f"{home.rstrip('/')}/{ZERO_SHOT_DIR}/cache/{key}.npy"


def text_embeddings(
    clip, processor, texts: Sequence[str], device: str = "cpu", batch_size: int = 256, progress=None
) -> np.ndarray:
    """Unit CLIP text embeddings [n, d] (float32), ``batch_size`` texts per forward pass; ``progress(n)``
    after each batch."""
    import torch

    max_length = int(clip.config.text_config.max_position_embeddings)
    out = []
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start : start + batch_size])
        enc = processor.tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.inference_mode():
            feats = clip.get_text_features(
                input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)
            )
        out.append(_features(feats))
        if progress is not None:
            progress(len(batch))
    return (
        normalise_rows(np.concatenate(out), np.float32)
        if out
        else np.zeros((0, clip.config.projection_dim), np.float32)
    )


def image_embeddings(clip, processor, images: Sequence, device: str = "cpu") -> np.ndarray:
    """Unit CLIP image embeddings [n, d] (float32) of PIL images, through the processor (resize, crop, normalise)."""
    import torch

    if not images:
        return np.zeros((0, clip.config.projection_dim), np.float32)
    pixels = processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        return normalise_rows(_features(clip.get_image_features(pixel_values=pixels.to(device))), np.float32)


def bank_text_embeddings(
    home: str,
    model: str,
    prompts: Sequence[str],
    bank_sha256: str,
    clip,
    processor,
    device: str = "cpu",
    batch_size: int = 256,
    progress=None,
) -> tuple[np.ndarray, bool]:
    """(the bank's unit CLIP text embeddings, whether they came from the cache); computed and cached on a miss
    or when the cache is damaged or does not match the bank's size."""
    path = cache_path(home, model, bank_sha256)
    if store.exists(path):
        try:
            store.verify(path)
            with store.as_path(path).open("rb") as f:
                cached = np.load(f, allow_pickle=False)
            if cached.shape[0] == len(prompts) and cached.ndim == 2:
                return cached.astype(np.float32, copy=False), True
        except (store.IntegrityError, ValueError, OSError):
            pass  # derivable: recomputed and rewritten below
    embeddings = text_embeddings(clip, processor, prompts, device, batch_size, progress)
    with store.atomic_local_path(path, suffix=".npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, embeddings, allow_pickle=False)
    return embeddings, False


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores per row, best first (ties: lower index first)."""
    k = max(1, min(k, scores.shape[1]))
    if k < scores.shape[1]:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(scores, part, axis=1)
        rank = np.lexsort((part, -order), axis=1)
        return np.take_along_axis(part, rank, axis=1)
    return np.argsort(-scores, axis=1, kind="stable")


class ZeroShotRetriever:
    """Ranks the prompt bank under ``home`` by CLIP image-text cosine. It exposes what `reverse-sd predict`
    uses of a PromptPredictor (``method``, ``vocabulary``, ``toy_models``, ``predict``), so the CLI writes
    its predictions the same way; ``retrieve`` takes images already in memory (the report's test split)."""

    def __init__(
        self,
        home: str,
        clip: str = DEFAULT_CLIP,
        device: str = "auto",
        batch_size: int = 32,
        text_batch_size: int = 256,
        progress: Callable[[int], Callable[[int], None] | None] | None = None,
    ):
        """``progress(total)`` may return a callback called with the number of bank prompts encoded per batch
        (a progress bar), when the bank is encoded rather than read from the cache."""
        from pipeline.inputs import check_batch_size, resolve_predict_device

        self.home = home.rstrip("/")
        self.batch_size = check_batch_size(batch_size)
        self.device = resolve_predict_device(device)
        self.clip_id = clip
        self.bank_prompts, self.bank_embeddings, self.bank_sha256 = load_bank(self.home)
        self.model, self.processor = load_clip(clip, self.device)
        will_encode = not store.exists(cache_path(self.home, clip, self.bank_sha256))
        callback = progress(len(self.bank_prompts)) if progress is not None and will_encode else None
        self.text, self.cached = bank_text_embeddings(
            self.home,
            clip,
            self.bank_prompts,
            self.bank_sha256,
            self.model,
            self.processor,
            self.device,
            text_batch_size,
            callback,
        )
        self.description = describe(clip)
        self.method = f"zero-shot CLIP ({self.description})"
        self.vocabulary = None  # no vocabulary head
        self.captioner = None

    @property
    def toy_models(self) -> bool:
        """True for the random-init twin: its ranking exercises the code path and means nothing."""
        return is_twin(self.clip_id)

    def retrieve(self, images: Sequence, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """(bank indices [n, k] best first, their CLIP cosines [n, k]) for PIL images or encoded bytes."""
        from pipeline.data.images import open_image

        pil = [open_image(bytes(im)) if isinstance(im, (bytes, bytearray, memoryview)) else im for im in images]
        indices, scores = [], []
        for start in range(0, len(pil), self.batch_size):
            emb = image_embeddings(self.model, self.processor, pil[start : start + self.batch_size], self.device)
            sims = emb @ self.text.T
            best = top_k(sims, k)
            indices.append(best)
            scores.append(np.take_along_axis(sims, best, axis=1))
        if not indices:
            width = max(1, min(k, len(self.bank_prompts)))
            return np.zeros((0, width), np.int64), np.zeros((0, width), np.float32)
        return np.concatenate(indices), np.concatenate(scores)

    def predict(
        self, paths: Iterable[str | os.PathLike], options: PredictOptions = DEFAULT_OPTIONS
    ) -> Iterator[Prediction]:
        """One Prediction per path, in input order: the top-k bank prompts with their CLIP cosine, and as
        ``embedding`` the top-1 prompt's SBERT embedding; an unusable file is a Prediction with ``error``
        set. ``options.words`` and ``options.generate`` are accepted for the CLI and ignored (no head, no
        captioner)."""
        from pipeline.data.images import open_image
        from pipeline.inputs import read_input_file

        top_k = options.top_k

        def predict_loaded(chunk: list[Path], images: list) -> list[Prediction]:
            best, scores = self.retrieve(images, max(top_k, 1))
            results = []
            for row, path in enumerate(chunk):
                prompts = [(self.bank_prompts[j], float(s)) for j, s in zip(best[row], scores[row])]
                embedding = self.bank_embeddings[best[row, 0]]
                results.append(Prediction(path, embedding, prompts[:top_k] if top_k > 0 else []))
            return results

        load = lambda path: open_image(read_input_file(path, options.max_bytes), name=str(path))  # noqa: E731
        return predict_in_batches(paths, self.batch_size, load, predict_loaded)


def top1_sbert_cosine(retriever: ZeroShotRetriever, images: Sequence, targets: np.ndarray) -> float:
    """The report's zero-shot baseline: mean cosine between the SBERT embedding of each image's top-1
    retrieved bank prompt and its true prompt's embedding (``targets``, row-aligned with ``images``)."""
    best, _ = retriever.retrieve(images, k=1)
    predicted = normalise_rows(retriever.bank_embeddings[best[:, 0]], np.float32)
    return float((predicted * normalise_rows(targets, np.float32)).sum(axis=1).mean())
