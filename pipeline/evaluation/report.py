"""The evaluation report: the paper's Table 1 on our data, baselines, and its Markdown / HTML / JSON forms."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field

import numpy as np

# Mean cosine on DiffusionDB test, from the paper (../shared/paper-notes.md), for reference only.
PAPER_TABLE = {
    "clip": {"baseline": 0.6725, "mlc": 0.6739, "mlc_cl": 0.6750},
    "unet": {"baseline": 0.6130, "mlc": 0.6455, "mlc_cl": 0.6497},
    "swin": {"baseline": 0.6624, "mlc": 0.6671, "mlc_cl": 0.6671},
    "vit": {"baseline": 0.6526, "mlc": 0.6539, "mlc_cl": 0.6550},
    "ensemble": {"baseline": 0.6841, "mlc": 0.6879, "mlc_cl": 0.6900},
}
PAPER_DAKL = 0.6917
PAPER_KNN = 0.6189
RECIPE_TITLES = {"baseline": "baseline", "mlc": "+ MLC", "mlc_cl": "+ MLC + CL"}


def normalise_rows(matrix: np.ndarray) -> np.ndarray:
    """Unit-length rows (zero rows stay zero)."""
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


def row_cosines(predictions: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return (normalise_rows(predictions) * normalise_rows(targets)).sum(axis=1)


def mean_cosine(predictions: np.ndarray, targets: np.ndarray) -> float:
    """The paper's and Kaggle's metric: mean row-wise cosine."""
    return float(row_cosines(predictions, targets).mean())


def knn_baseline(
    train_features: np.ndarray, train_targets: np.ndarray, test_features: np.ndarray, k: int = 5
) -> np.ndarray:
    """Predict each test embedding as the mean target of its k nearest training images (cosine)."""
    from sklearn.neighbors import NearestNeighbors

    k = max(1, min(k, len(train_features)))
    index = NearestNeighbors(n_neighbors=k, metric="cosine").fit(train_features)
    _, neighbours = index.kneighbors(test_features)
    return normalise_rows(train_targets[neighbours].mean(axis=1))


@dataclass
class Report:
    profile: str
    split: str
    cosine: dict[str, float]  # "vit/baseline", "ensemble/median", "ensemble+dakl", "baseline/knn", ...
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    figures: dict[str, str] = field(default_factory=dict)  # title -> data URI of a PNG
    # Prompt generation, one row per captioner: captioner, variant, sbert_cosine, refclip_score, clip_s, ...
    generation: list[dict] = field(default_factory=list)

    def to_json(self) -> str:
        payload = {"split": self.split, "profile": self.profile, "cosine": self.cosine, "counts": self.counts}
        if self.generation:
            payload["generation"] = self.generation
        return json.dumps(payload, indent=2, sort_keys=True, default=float)

    def generation_rows(self) -> list[list[str]]:
        """Generated prompts scored like Kaggle (SBERT cosine to the true prompt) and by RefCLIPScore."""
        return [
            [
                f"{r['captioner']} ({r.get('variant', '')})",
                f"{r['sbert_cosine']:.4f}",
                f"{r['refclip_score']:.4f}",
                f"{r['kaggle_first_place']:.5f}",
            ]
            for r in self.generation
        ]

    def table_rows(self) -> list[list[str]]:
        def fmt(key: str) -> str:
            value = self.cosine.get(key)
            return "-" if value is None else f"{value:.4f}"

        def paper(row: str, recipe: str) -> str:
            value = PAPER_TABLE.get(row, {}).get(recipe)
            return "" if value is None else f" ({value:.4f})"

        rows = []
        for backbone in ("vit", "swin", "clip", "unet"):
            rows.append(
                [backbone] + [fmt(f"{backbone}/{r}") + paper(backbone, r) for r in RECIPE_TITLES]
            )
        for method in ("median", "mean"):
            rows.append(
                [f"ensemble {method}"]
                + [fmt(f"ensemble/{method}/{r}") + (paper("ensemble", r) if method == "median" else "") for r in RECIPE_TITLES]
            )
        rows.append(["ensemble + DAKL", "-", "-", fmt("ensemble+dakl") + f" ({PAPER_DAKL:.4f})"])
        return rows

    def markdown(self) -> str:
        header = ["model", *RECIPE_TITLES.values()]
        lines = [
            f"# reverse-sd evaluation ({self.profile} profile, {self.split} split)",
            "",
            f"Mean cosine between predicted and true all-MiniLM-L6-v2 prompt embeddings on the {self.split} split "
            "of this run; the paper's DiffusionDB figures in parentheses, for reference only"
            + (" (sample-profile figures are not DiffusionDB figures)." if self.profile == "sample" else "."),
            "",
            "| " + " | ".join(header) + " |",
            "| " + " | ".join("---" for _ in header) + " |",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in self.table_rows()]
        lines += [
            "",
            "| baseline | cosine |",
            "| --- | --- |",
            f"| mean training embedding | {self.cosine.get('baseline/mean_embedding', float('nan')):.4f} |",
            f"| k-NN on image features (paper, CLIP features: {PAPER_KNN:.4f}) | "
            f"{self.cosine.get('baseline/knn', float('nan')):.4f} |",
            "",
        ]
        if self.generation:
            lines += [
                "| generated prompts | SBERT cosine (Kaggle metric) | RefCLIPScore | Kaggle first place |",
                "| --- | --- | --- | --- |",
                *["| " + " | ".join(row) + " |" for row in self.generation_rows()],
                "",
            ]
        if self.counts:
            lines += ["Pairs: " + ", ".join(f"{k} {v}" for k, v in self.counts.items()), ""]
        lines += [f"- {note}" for note in self.notes]
        for title, uri in self.figures.items():
            lines += ["", f"## {title}", "", f"![{title}]({uri})"]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        header = ["model", *RECIPE_TITLES.values()]
        cells = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self.table_rows()
        )
        figures = "".join(
            f"<h2>{html.escape(t)}</h2><img alt='{html.escape(t)}' src='{uri}'/>" for t, uri in self.figures.items()
        )
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.notes)
        generation = ""
        if self.generation:
            heads = ("generated prompts", "SBERT cosine (Kaggle metric)", "RefCLIPScore", "Kaggle first place")
            generation = (
                "<table><tr>" + "".join(f"<th>{h}</th>" for h in heads) + "</tr>"
                + "".join(
                    "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                    for row in self.generation_rows()
                )
                + "</table>"
            )
        return (
            "<!doctype html><html><head><meta charset='utf-8'><title>reverse-sd evaluation</title>"
            "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}</style></head><body>"
            f"<h1>reverse-sd evaluation ({html.escape(self.profile)} profile, {html.escape(self.split)} split)</h1>"
            "<p>Mean cosine on this run's data; the paper's DiffusionDB figures in parentheses.</p>"
            "<table><tr>" + "".join(f"<th>{h}</th>" for h in header) + f"</tr>{cells}</table>"
            f"<p>Mean training embedding: {self.cosine.get('baseline/mean_embedding', float('nan')):.4f}; "
            f"k-NN on image features: {self.cosine.get('baseline/knn', float('nan')):.4f}</p>"
            f"{generation}<ul>{notes}</ul>{figures}</body></html>"
        )
