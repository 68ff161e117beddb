"""Load once, predict many: image in, predicted prompt embedding and nearest prompts out.

Uses the latest trained artifacts under the storage root: the ensemble (+ DAKL when fitted), or one
named backbone.  Images go through the same path as training data (decode, resize to 256, re-encode,
then the backbone's own preprocessing), so predictions match what the models saw.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from pipeline import storage as store
from pipeline.ensemble.ensemble import combine
from pipeline.inputs import (
    MAX_INPUT_BYTES,
    check_batch_size,
    path_batches,
    read_input_file,
    resolve_predict_device,
)
from pipeline.metrics import normalise_rows


class NotTrainedError(RuntimeError):
    """Nothing to predict with yet; the message names the asset to materialize."""


@dataclass
class Prediction:
    """One input's result: the unit embedding, the nearest bank prompts (prompt, cosine), the vocabulary
    head's most probable words (word, probability; empty without a vocabulary head), the captioner's prompt
    when asked; or ``error`` (the reason the file was skipped) with everything else empty."""

    path: Path
    embedding: np.ndarray | None = None
    prompts: list[tuple[str, float]] = field(default_factory=list)
    words: list[tuple[str, float]] = field(default_factory=list)
    generated: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class PredictOptions:
    """What a caller asks of any Predictor, one object so that the predictors and their protocol cannot
    drift apart: the ``top_k`` nearest bank prompts, the ``words`` most probable vocabulary words, the
    captioner's prompt (``generate``), and the largest file read (``max_bytes``)."""

    top_k: int = 5
    words: int = 0
    generate: bool = False
    max_bytes: int = MAX_INPUT_BYTES


DEFAULT_OPTIONS = PredictOptions()


class Predictor(Protocol):
    """What `reverse-sd predict` and `reverse-sd evaluate` run: the trained models (PromptPredictor) and
    zero-shot CLIP retrieval (ZeroShotPredictor) both answer it, one Prediction per path in input order."""

    method: str

    def predict(
        self, paths: Iterable[str | os.PathLike], options: PredictOptions = DEFAULT_OPTIONS
    ) -> Iterator[Prediction]: ...


def predict_in_batches(
    paths: Iterable[str | os.PathLike],
    batch_size: int,
    load: Callable[[Path], object],
    predict_loaded: Callable[[list[Path], list], list[Prediction]],
    map_: Callable = map,
) -> Iterator[Prediction]:
    """Every predictor's walk: paths in batches, each file loaded by ``load`` (through ``map_``, e.g. a
    thread pool's), the ones that loaded predicted together by ``predict_loaded(paths, inputs)``, and a file
    that could not be used (ImageError, or an OSError such as InputError) a Prediction with ``error`` set."""
    from pipeline.data.images import ImageError

    def safe_load(path: Path):
        try:
            return load(path), None
        except ImageError as exc:
            return None, exc.detail
        except OSError as exc:  # InputError, or an I/O error while reading
            return None, str(exc) or type(exc).__name__

    for chunk in path_batches(paths, batch_size):
        loaded = list(map_(safe_load, chunk))
        good = [i for i, (_, error) in enumerate(loaded) if error is None]
        results = [Prediction(path, error=error) for path, (_, error) in zip(chunk, loaded)]
        if good:
            predicted = predict_loaded([chunk[i] for i in good], [loaded[i][0] for i in good])
            for i, prediction in zip(good, predicted):
                results[i] = prediction
        yield from results


@dataclass
class LoadedModel:
    backbone: str
    recipe: str
    model: object
    config: dict = field(default_factory=dict)  # the checkpoint's model_config (backbone, variant, vocab_size ...)


class PromptPredictor:
    """``captioner`` ("auto" = the first trained one, or a name) also loads a prompt-writing captioner, for
    ``predict_files(..., generate=True)`` / ``generate_stored``."""

    def __init__(
        self, home: str, model: str = "auto", device: str = "auto", batch_size: int = 32, captioner: str | None = None
    ):
        self.home = home.rstrip("/")
        self.batch_size = check_batch_size(batch_size)  # at most MAX_BATCH_SIZE: memory grows with it
        self.device = resolve_predict_device(device)
        self.bank_prompts, self.bank_embeddings = self._load_bank()
        self.members = self._choose_members(model)
        self.dakl = self._load_dakl() if model in ("auto", "ensemble") and len(self.members) > 1 else None
        self.method = (
            "ensemble+dakl" if self.dakl else ("ensemble" if len(self.members) > 1 else self.members[0].backbone)
        )
        self.captioner = self._load_captioner(captioner) if captioner else None
        self.vocabulary = self._load_vocabulary()

    @property
    def toy_models(self) -> bool:
        """True when a loaded model is a tiny random-init twin (what the sample profile trains), as its
        checkpoint's model_config records it: its prompts say little about real Stable Diffusion images."""
        return any(m.config.get("variant", "full") != "full" for m in self.members)

    # -- loading ---------------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return "/".join([self.home, *parts])

    @staticmethod
    def _read_table(path: str, asset: str):
        """An artifact of ``asset``, checked against its recorded hash; damage names the asset to rebuild."""
        try:
            return store.read_parquet(path)
        except store.IntegrityError as exc:
            raise store.IntegrityError(
                f"{exc}: re-materialize the asset {asset} (reverse-sd materialize --stale)"
            ) from None

    def _load_bank(self):
        path = self._path("prompt_bank.parquet")
        if not store.exists(path):
            raise NotTrainedError(f"no prompt bank under {self.home}: materialize the asset prompt_bank (make run)")
        bank = self._read_table(path, "prompt_bank")
        return bank["prompt"].to_list(), bank["embedding"].to_numpy().astype(np.float32)

    def _choose_members(self, model: str) -> list[LoadedModel]:
        from pipeline.training.checkpoint import latest_checkpoint

        ensemble_file = self._path("models", "ensemble.json")
        if model in ("auto", "ensemble"):
            if not store.exists(ensemble_file):
                if model == "ensemble":
                    raise NotTrainedError(f"no ensemble under {self.home}: materialize the asset ensemble_predictions")
                members = {}
            else:
                members = json.loads(store.as_path(ensemble_file).read_text())["members"]
            if not members:
                raise NotTrainedError(
                    f"no trained model under {self.home}: materialize trained_models and ensemble_predictions (make run)"
                )
        else:
            recipes = ("mlc_cl", "mlc", "baseline")
            chosen = next(
                (r for r in recipes if latest_checkpoint(self._path("trained_models", model, r)) is not None), None
            )
            if chosen is None:
                raise NotTrainedError(
                    f"no trained {model!r} model under {self.home}: materialize trained_models for backbone {model}"
                )
            members = {model: chosen}
        return [self._load_model(b, r) for b, r in members.items()]

    def _load_model(self, backbone: str, recipe: str) -> LoadedModel:
        from pipeline.training.checkpoint import latest_checkpoint, load_model

        checkpoint = latest_checkpoint(self._path("trained_models", backbone, recipe))
        if checkpoint is None:
            raise NotTrainedError(f"no checkpoint for {backbone}/{recipe}: materialize trained_models")
        model = load_model(checkpoint, device=self.device)
        return LoadedModel(backbone, recipe, model, model.config_dict())

    def _load_vocabulary(self) -> list[str] | None:
        """The vocabulary asset's words in head order, when a loaded model has a vocabulary head of its size."""
        sizes = {int(getattr(m.model, "vocab_size", 0) or 0) for m in self.members} - {0}
        path = self._path("vocabulary.parquet")
        if not sizes or not store.exists(path):
            return None
        try:
            words = self._read_table(path, "vocabulary").sort("index")["word"].to_list()
        except store.IntegrityError:
            raise
        except Exception as exc:  # noqa: BLE001 - polars / pyarrow raise many types for a damaged file
            raise ValueError(f"cannot read {path} ({type(exc).__name__}): materialize the asset vocabulary") from exc
        return words if len(words) in sizes else None

    def _load_captioner(self, name: str):
        """A trained captioner (trained_captioners/<name>); "auto" takes the first registered one found."""
        from pipeline.captioning import CAPTIONERS, load_captioner
        from pipeline.training.checkpoint import latest_checkpoint

        names = CAPTIONERS.names() if name == "auto" else [name]
        for candidate in names:
            directory = self._path("trained_captioners", candidate)
            if latest_checkpoint(directory) is not None:
                return load_captioner(directory, self.device)
        raise NotTrainedError(
            f"no trained captioner {'' if name == 'auto' else repr(name) + ' '}under {self.home}: "
            "materialize the asset trained_captioners"
        )

    def _load_dakl(self):
        """The DAKL regressor as dakl_predictions fitted it for test: centroids + the test split as U.

        Fitted once here, so an image's prediction does not depend on what else is in its batch.
        """
        from pipeline.ensemble.dakl import DAKLRegressor

        params_file = self._path("models", "dakl.json")
        centroids_file = self._path("kmeans_centroids.parquet")
        ensemble_file = self._path("ensemble_predictions.parquet")
        if not all(store.exists(f) for f in (params_file, centroids_file, ensemble_file)):
            return None
        params = json.loads(store.as_path(params_file).read_text())
        centroids = self._read_table(centroids_file, "kmeans_centroids")
        ensemble = self._read_table(ensemble_file, "ensemble_predictions")
        target = ensemble.filter(ensemble["split"] == "test")[params["ensemble"]].to_numpy().astype(np.float32)
        return DAKLRegressor(gamma=params["gamma"], alpha=params["alpha"]).fit(
            centroids["centroid"].to_numpy().astype(np.float32),
            centroids["label"].to_numpy().astype(np.float32),
            target,
        )

    # -- predicting ------------------------------------------------------------------------------
    def embed(self, images: Sequence[bytes]) -> np.ndarray:
        """Predicted, unit-length prompt embeddings for encoded images (a batch at a time)."""
        from pipeline.data.images import reencode_image

        return self.embed_stored(list(self._pool().map(lambda b: reencode_image(b, size=256), images)))

    def _pool(self):
        """Threads for image decoding and re-encoding: Pillow releases the GIL there, so a batch uses every core."""
        if getattr(self, "_threads", None) is None:
            from concurrent.futures import ThreadPoolExecutor

            self._threads = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
        return self._threads

    def embed_stored(self, stored: Sequence[bytes], word_probs: list | None = None) -> np.ndarray:
        """As embed, for images already re-encoded the way diffusiondb_parts stores them.

        With a list as ``word_probs``, the vocabulary heads' mean sigmoid probabilities ([n, K], over the
        members whose head matches the vocabulary) are appended to it, or nothing without such a head.
        """
        import torch

        from pipeline.training.datasets import image_tensor

        outputs, probs = [], []
        unit_pixels: dict[int, torch.Tensor] = {}  # decoded once per input size, normalised per model
        for member in self.members:
            model = member.model
            size = model.image_size
            if size not in unit_pixels:
                decode = functools.partial(image_tensor, image_size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
                unit_pixels[size] = torch.stack(list(self._pool().map(decode, stored)))
            mean = torch.tensor(model.mean).view(1, 3, 1, 1)
            std = torch.tensor(model.std).view(1, 3, 1, 1)
            pixels = ((unit_pixels[size] - mean) / std).to(self.device)
            with torch.inference_mode():
                embedding, logits = model(pixels)
            outputs.append(embedding.float().cpu().numpy())
            if word_probs is not None and logits is not None and self.vocabulary is not None:
                if logits.shape[-1] == len(self.vocabulary):
                    probs.append(torch.sigmoid(logits.float()).cpu().numpy())
        combined = combine(outputs, "median")  # the ensemble asset's function: the median over the members
        if self.dakl is not None:
            combined = normalise_rows(self.dakl.predict(combined))
        if word_probs is not None and probs:
            word_probs.append(np.mean(probs, axis=0))
        return combined.astype(np.float32)

    def generate_stored(self, stored: Sequence[bytes]) -> list[str]:
        """Prompts written by the captioner for images re-encoded as diffusiondb_parts stores them."""
        from pipeline.captioning import generate_prompts

        if self.captioner is None:
            raise NotTrainedError("no captioner loaded: create the predictor with captioner='auto'")
        return generate_prompts(self.captioner, list(stored), self.batch_size, device=self.device)

    def top_k(self, embeddings: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
        """The k bank prompts with the highest cosine, best first."""
        scores = embeddings @ self.bank_embeddings.T
        k = min(k, scores.shape[1])
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return [[(self.bank_prompts[j], float(scores[i, j])) for j in row] for i, row in enumerate(best)]

    def top_words(self, probs: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """The k most probable vocabulary words per row of ``probs`` ([n, K] head probabilities), best first."""
        if self.vocabulary is None or k <= 0:
            return [[] for _ in range(len(probs))]
        k = min(k, probs.shape[1])
        best = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[(self.vocabulary[j], float(probs[i, j])) for j in row] for i, row in enumerate(best)]

    def read_image(self, path: str | os.PathLike, max_bytes: int = MAX_INPUT_BYTES) -> bytes:
        """A file as the models see it (re-encoded as diffusiondb_parts stores images), or InputError /
        ImageError naming why not: only a regular file within ``max_bytes`` is read."""
        from pipeline.data.images import reencode_image

        return reencode_image(read_input_file(path, max_bytes), size=256, name=str(path))

    def predict(
        self, paths: Iterable[str | os.PathLike], options: PredictOptions = DEFAULT_OPTIONS
    ) -> Iterator[Prediction]:
        """One Prediction per path, in input order, batch by batch (files read and decoded on the pool's
        threads); a file that cannot be used is a Prediction with ``error`` set, never an exception."""
        top_k, words = options.top_k, options.words

        def predict_loaded(chunk: list[Path], stored: list[bytes]) -> list[Prediction]:
            probs: list[np.ndarray] = []
            embeddings = self.embed_stored(stored, probs if words > 0 else None)
            prompts = self.top_k(embeddings, top_k) if top_k > 0 else [[] for _ in stored]
            found = self.top_words(probs[0], words) if probs else [[] for _ in stored]
            written = self.generate_stored(stored) if options.generate else [None] * len(stored)
            return [Prediction(*fields) for fields in zip(chunk, embeddings, prompts, found, written)]

        load = functools.partial(self.read_image, max_bytes=options.max_bytes)
        return predict_in_batches(paths, self.batch_size, load, predict_loaded, self._pool().map)

    def predict_files(self, paths: Iterable[Path], generate: bool = False):
        """Yield (path, embedding or None, error or None) in input order, batch by batch; with ``generate``
        a fourth item, the captioner's prompt (None for a file that could not be read)."""
        for result in self.predict(paths, PredictOptions(top_k=0, generate=generate)):
            yield (result.path, result.embedding, result.error, *((result.generated,) if generate else ()))
