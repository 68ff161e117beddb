"""Load once, predict many: image in, predicted prompt embedding and nearest prompts out.

Uses the latest trained artifacts under the storage root: the ensemble (+ DAKL when fitted), or one
named backbone.  Images go through the same path as training data (decode, resize to 256, re-encode,
then the backbone's own preprocessing), so predictions match what the models saw.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import storage as store
from pipeline.ensemble.ensemble import combine
from pipeline.evaluation.report import normalise_rows

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


class NotTrainedError(RuntimeError):
    """Nothing to predict with yet; the message names the asset to materialize."""


def expand_inputs(paths: Sequence[str]) -> list[Path]:
    """Files, folders (recursive) and globs -> image-looking files, in a stable order, without repeats."""
    found: list[Path] = []
    for raw in paths:
        matches = glob.glob(raw, recursive=True) if any(c in raw for c in "*?[") else [raw]
        for match in matches:
            path = Path(match)
            if path.is_dir():
                found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            else:
                found.append(path)
    seen, unique = set(), []
    for path in found:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


@dataclass
class LoadedModel:
    backbone: str
    recipe: str
    model: object


class PromptPredictor:
    """``captioner`` ("auto" = the first trained one, or a name) also loads a prompt-writing captioner, for
    ``predict_files(..., generate=True)`` / ``generate_stored``."""

    def __init__(
        self, home: str, model: str = "auto", device: str = "auto", batch_size: int = 32, captioner: str | None = None
    ):
        self.home = home.rstrip("/")
        self.device = _resolve_device(device)
        self.batch_size = batch_size
        self.bank_prompts, self.bank_embeddings = self._load_bank()
        self.members = self._choose_members(model)
        self.dakl = self._load_dakl() if model in ("auto", "ensemble") and len(self.members) > 1 else None
        self.method = "ensemble+dakl" if self.dakl else ("ensemble" if len(self.members) > 1 else self.members[0].backbone)
        self.captioner = self._load_captioner(captioner) if captioner else None

    # -- loading ---------------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return "/".join([self.home, *parts])

    def _load_bank(self):
        path = self._path("prompt_bank.parquet")
        if not store.exists(path):
            raise NotTrainedError(f"no prompt bank under {self.home}: materialize the asset prompt_bank (make run)")
        bank = store.read_parquet(path)
        return bank["prompt"].to_list(), bank["embedding"].to_numpy().astype(np.float32)

    def _choose_members(self, model: str) -> list[LoadedModel]:
        from pipeline.training.checkpoint import latest_checkpoint

        ensemble_file = self._path("models", "ensemble.json")
        if model in ("auto", "ensemble"):
            if not store.exists(ensemble_file):
                if model == "ensemble":
                    raise NotTrainedError(
                        f"no ensemble under {self.home}: materialize the asset ensemble_predictions"
                    )
                members = {}
            else:
                members = json.loads(store.as_path(ensemble_file).read_text())["members"]
            if not members:
                raise NotTrainedError(f"no trained model under {self.home}: materialize trained_models and ensemble_predictions (make run)")
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
        from pipeline.training.checkpoint import latest_checkpoint, load_model_weights
        from pipeline.models import create_model

        checkpoint = latest_checkpoint(self._path("trained_models", backbone, recipe))
        if checkpoint is None:
            raise NotTrainedError(f"no checkpoint for {backbone}/{recipe}: materialize trained_models")
        state, config = load_model_weights(checkpoint)
        model = create_model(**config)
        model.load_state_dict(state)
        model.eval().to(self.device)
        return LoadedModel(backbone, recipe, model)

    def _load_captioner(self, name: str):
        """A trained captioner (trained_captioners/<name>); "auto" takes the first registered one found."""
        from pipeline.captioning.captioner import available_captioners, load_captioner
        from pipeline.training.checkpoint import latest_checkpoint

        names = available_captioners() if name == "auto" else [name]
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
        centroids = store.read_parquet(centroids_file)
        ensemble = store.read_parquet(ensemble_file)
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

    def embed_stored(self, stored: Sequence[bytes]) -> np.ndarray:
        """As embed, for images already re-encoded the way diffusiondb_parts stores them."""
        import torch

        from pipeline.training.datasets import decode_image

        outputs = []
        unit_pixels: dict[int, torch.Tensor] = {}  # decoded once per input size, normalised per model
        for member in self.members:
            model = member.model
            size = model.image_size
            if size not in unit_pixels:
                decode = lambda b: decode_image(b, size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # noqa: E731
                unit_pixels[size] = torch.stack(list(self._pool().map(decode, stored)))
            mean = torch.tensor(model.mean).view(1, 3, 1, 1)
            std = torch.tensor(model.std).view(1, 3, 1, 1)
            pixels = ((unit_pixels[size] - mean) / std).to(self.device)
            with torch.inference_mode():
                embedding, _ = model(pixels)
            outputs.append(embedding.float().cpu().numpy())
        combined = combine(outputs, "median")  # the ensemble asset's function: the median over the members
        if self.dakl is not None:
            combined = normalise_rows(self.dakl.predict(combined))
        return combined.astype(np.float32)

    def generate_stored(self, stored: Sequence[bytes]) -> list[str]:
        """Prompts written by the captioner for images re-encoded as diffusiondb_parts stores them."""
        from pipeline.captioning.captioner import generate_prompts

        if self.captioner is None:
            raise NotTrainedError("no captioner loaded: create the predictor with captioner='auto'")
        return generate_prompts(self.captioner, list(stored), self.batch_size, device=self.device)

    def top_k(self, embeddings: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
        """The k bank prompts with the highest cosine, best first."""
        scores = embeddings @ self.bank_embeddings.T
        k = min(k, scores.shape[1])
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return [[(self.bank_prompts[j], float(scores[i, j])) for j in row] for i, row in enumerate(best)]

    def predict_files(self, paths: Iterable[Path], generate: bool = False):
        """Yield (path, embedding or None, error or None) in input order, batch by batch; with ``generate``
        a fourth item, the captioner's prompt (None for a file that could not be read)."""
        from pipeline.data.images import ImageError, reencode_image

        batch: list[tuple[Path, bytes]] = []
        extra = (None,) if generate else ()

        def flush():
            if not batch:
                return []
            embeddings = self.embed_stored([b for _, b in batch])
            if generate:
                written = self.generate_stored([b for _, b in batch])
                out = [(p, e, None, g) for (p, _), e, g in zip(batch, embeddings, written)]
            else:
                out = [(p, e, None) for (p, _), e in zip(batch, embeddings)]
            batch.clear()
            return out

        for path in paths:
            try:
                data = reencode_image(Path(path).read_bytes(), size=256)
            except (OSError, ImageError) as exc:
                yield (path, None, str(exc) or type(exc).__name__, *extra)
                continue
            batch.append((path, data))
            if len(batch) >= self.batch_size:
                yield from flush()
        yield from flush()


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return device
