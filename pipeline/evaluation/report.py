"""The evaluation report: the paper's Table 1 on our data, baselines, and its Markdown / HTML / JSON forms."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from pipeline.metrics import mean_cosine, mean_embedding_baseline, row_cosines

# Mean cosine on the DiffusionDB test split as published in Croitoru et al., "Reverse Stable Diffusion: What
# prompt was used to generate this image?" (Table 1: backbone x recipe, the ensemble, ensemble + DAKL; and the
# k-NN baseline on CLIP ViT-H/14 image features). For reference beside this run's figures only.
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
TABLE_BACKBONES = ("vit", "swin", "clip", "unet")
# The zero-shot baseline: top-1 prompt-bank prompt by CLIP image-text cosine (pipeline.zero_shot), no training.
ZERO_SHOT_KEY = "baseline/zero_shot_clip"
DIGITS = 4  # every figure the report shows is rounded to 4 decimals, as the paper prints them


def paper_column(title: str) -> str:
    return f"{title} (paper)"


# Table 1's columns as (name, type): this run's mean cosine per recipe, the paper's figure beside it.
TABLE1_COLUMNS = [("model", "string")] + [
    column for title in RECIPE_TITLES.values() for column in ((title, "float"), (paper_column(title), "float"))
]
# Table 1 as the UI shows it: every figure as text with exactly DIGITS decimals ("0.6590", as evaluation.html
# prints it; the UI shows a float cell as a JavaScript number, "0.659").
TABLE1_TEXT_COLUMNS = [(name, "string") for name, _ in TABLE1_COLUMNS]
BASELINE_COLUMNS = [("baseline", "string"), ("test cosine", "float"), ("paper", "float")]
# The per-source table (one row per data source of the test split: "diffusiondb", "images"): its headline
# figures, column title -> the report's cosine key; every figure per source is in table_by_source and the JSON.
SOURCE_HEADLINES = {
    "ensemble + DAKL": "ensemble+dakl",
    "ensemble median": "ensemble/median",
    "ensemble mean": "ensemble/mean",
    "mean training embedding": "baseline/mean_embedding",
    "k-NN": "baseline/knn",
    "zero-shot CLIP": ZERO_SHOT_KEY,
}
# Figures as fixed-decimal text, as Table 1 in the UI.
SOURCE_TEXT_COLUMNS = [("source", "string"), ("test pairs", "int")] + [(t, "string") for t in SOURCE_HEADLINES]
SOURCE_NAMES = {"diffusiondb": "DiffusionDB parts", "images": "REVERSE_SD_IMAGES folders"}
GENERATION_COLUMNS = [
    ("captioner", "string"),
    ("SBERT cosine (Kaggle metric)", "float"),
    ("RefCLIPScore", "float"),
    ("Kaggle first place", "float"),
]


def rounded(value, digits: int = DIGITS):
    """A float rounded to ``digits`` decimals (None for None or NaN, which JSON and the UI cannot show)."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else round(value, digits)


def _ensemble_key(method: str, group: str) -> str:
    """The report's name of an ensemble: "ensemble/median" over the best recipes, else "ensemble/median/mlc"."""
    return f"ensemble/{method}" if group == "best" else f"ensemble/{method}/{group}"


@dataclass(frozen=True)
class SplitScores:
    cosine: dict[str, float]  # the report's keys ("vit/baseline", "ensemble/median", ...) -> mean test cosine
    per_row: dict[str, np.ndarray]  # "backbone/recipe" -> per-image test cosines (the histograms)


def score_test_split(
    test_targets: np.ndarray,
    train_targets: np.ndarray,
    models: Mapping[str, np.ndarray],
    ensembles: Mapping[tuple[str, str], np.ndarray],
    dakl: np.ndarray | None,
) -> SplitScores:
    """Table 1 on the test split: every model ("backbone/recipe" -> predictions), every ensemble
    ((method, group) -> predictions, group a recipe or "best"), ensemble + DAKL, and the mean training
    embedding baseline; all predictions row-aligned with ``test_targets``."""
    cosine, per_row = {}, {}
    for name, predictions in models.items():
        per_row[name] = row_cosines(predictions, test_targets)
        cosine[name] = float(per_row[name].mean())
    for (method, group), predictions in ensembles.items():
        cosine[_ensemble_key(method, group)] = mean_cosine(predictions, test_targets)
    if dakl is not None:
        cosine["ensemble+dakl"] = mean_cosine(dakl, test_targets)
    cosine["baseline/mean_embedding"] = mean_embedding_baseline(train_targets, test_targets)
    return SplitScores(cosine, per_row)


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
    # The CLIP model of the zero-shot retrieval baseline (cosine key ZERO_SHOT_KEY): a hub id or a description.
    zero_shot_model: str = ""
    # The same figures per data source of the test split ("diffusiondb", "images"): source -> cosine key -> value
    cosine_by_source: dict[str, dict[str, float]] = field(default_factory=dict)
    counts_by_source: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> split -> pairs

    def to_json(self) -> str:
        payload = {"split": self.split, "profile": self.profile, "cosine": self.cosine, "counts": self.counts}
        if self.cosine_by_source:
            payload["cosine_by_source"] = self.cosine_by_source
            payload["counts_by_source"] = self.counts_by_source
        if self.generation:
            payload["generation"] = self.generation
        if self.zero_shot_model:
            payload["zero_shot_model"] = self.zero_shot_model
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

    def table1_records(self) -> list[dict]:
        """Table 1 as records of TABLE1_COLUMNS, rounded: this run's figure, the paper's beside it (None where
        the run has no such model or the paper no such figure)."""

        def record(model: str, values: dict[str, float | None], paper: dict[str, float | None]) -> dict:
            out = {"model": model}
            for recipe, title in RECIPE_TITLES.items():
                out[title] = rounded(values.get(recipe))
                out[paper_column(title)] = rounded(paper.get(recipe))
            return out

        records = [
            record(b, {r: self.cosine.get(f"{b}/{r}") for r in RECIPE_TITLES}, PAPER_TABLE.get(b, {}))
            for b in TABLE_BACKBONES
        ]
        for method in ("median", "mean"):
            values = {r: self.cosine.get(_ensemble_key(method, r)) for r in RECIPE_TITLES}
            records.append(record(f"ensemble {method}", values, PAPER_TABLE["ensemble"] if method == "median" else {}))
        records.append(record("ensemble + DAKL", {"mlc_cl": self.cosine.get("ensemble+dakl")}, {"mlc_cl": PAPER_DAKL}))
        return records

    def table1_text_records(self) -> list[dict]:
        """table1_records with every figure as fixed-decimal text (``fixed``), for TABLE1_TEXT_COLUMNS."""
        kinds = dict(TABLE1_COLUMNS)
        return [
            {name: fixed(value) if kinds[name] == "float" else value for name, value in record.items()}
            for record in self.table1_records()
        ]

    def table1_markdown(self) -> str:
        """Table 1 as a Markdown table: every column of TABLE1_COLUMNS (this run's figure, the paper's beside
        it), figures right-aligned with exactly DIGITS decimals, "-" where there is none."""
        names = [name for name, _ in TABLE1_COLUMNS]
        align = ["---" if kind == "string" else "---:" for _, kind in TABLE1_COLUMNS]
        lines = ["| " + " | ".join(names) + " |", "| " + " | ".join(align) + " |"]
        lines += [
            "| " + " | ".join(str(record[name]).replace("|", "\\|") for name in names) + " |"
            for record in self.table1_text_records()
        ]
        return "\n".join(lines) + "\n"

    def baseline_records(self) -> list[dict]:
        """The baselines as records of BASELINE_COLUMNS, rounded, with the paper's figure where it has one."""
        records = [
            {
                "baseline": "mean training embedding",
                "test cosine": rounded(self.cosine.get("baseline/mean_embedding")),
                "paper": None,
            },
            {
                "baseline": "k-NN on image features (5 nearest; paper: CLIP ViT-H/14)",
                "test cosine": rounded(self.cosine.get("baseline/knn")),
                "paper": PAPER_KNN,
            },
        ]
        if ZERO_SHOT_KEY in self.cosine:
            records.append(
                {"baseline": self.zero_shot_label(), "test cosine": rounded(self.cosine[ZERO_SHOT_KEY]), "paper": None}
            )
        return records

    def source_test_pairs(self, source: str) -> int:
        return int(self.counts_by_source.get(source, {}).get(self.split, 0))

    def source_records(self) -> list[dict]:
        """One record per data source of SOURCE_TEXT_COLUMNS: its test pairs and headline figures as
        fixed-decimal text ("-" where the source has no such figure)."""
        return [
            {"source": source, "test pairs": self.source_test_pairs(source)}
            | {title: fixed(figures.get(key)) for title, key in SOURCE_HEADLINES.items()}
            for source, figures in self.cosine_by_source.items()
        ]

    def source_figure_keys(self) -> list[str]:
        """The cosine keys any source has, in the overall figures' order (then any the overall lacks)."""
        present = {key for figures in self.cosine_by_source.values() for key in figures}
        ordered = [key for key in self.cosine if key in present]
        return ordered + sorted(present - set(ordered))

    def by_source_markdown(self) -> str:
        """Every per-source figure as a Markdown table: a row per figure (the JSON's keys), a column for all
        test pairs and one per source, the test pairs first."""
        sources = list(self.cosine_by_source)
        lines = [
            "| figure | all | " + " | ".join(sources) + " |",
            "| --- | ---: | " + " | ".join("---:" for _ in sources) + " |",
            f"| test pairs | {self.counts.get(self.split, '-')} | "
            + " | ".join(str(self.source_test_pairs(s)) for s in sources)
            + " |",
        ]
        lines += [
            f"| {key} | {fixed(self.cosine.get(key))} | "
            + " | ".join(fixed(self.cosine_by_source[s].get(key)) for s in sources)
            + " |"
            for key in self.source_figure_keys()
        ]
        return "\n".join(lines) + "\n"

    def by_source_html(self) -> str:
        """by_source_markdown as an HTML table (figures right-aligned, 4 decimals)."""
        sources = list(self.cosine_by_source)
        columns = [("figure", "string"), ("all", "float"), *((s, "float") for s in sources)]
        records = [
            {"figure": "test pairs", "all": self.counts.get(self.split)}
            | {s: self.source_test_pairs(s) for s in sources}
        ]
        records += [
            {"figure": key, "all": rounded(self.cosine.get(key))}
            | {s: rounded(self.cosine_by_source[s].get(key)) for s in sources}
            for key in self.source_figure_keys()
        ]
        return _html_table(columns, records)

    def by_source_note(self) -> str:
        names = ", ".join(f"{s} = {SOURCE_NAMES.get(s, s)}" for s in self.cosine_by_source)
        return (
            f"Mean {self.split} cosine per data source ({names}); the mean-embedding baseline is the mean of all "
            "training prompts, scored on each source's pairs."
        )

    def zero_shot_label(self) -> str:
        return f"zero-shot CLIP retrieval ({self.zero_shot_model or 'CLIP'})"

    def generation_records(self) -> list[dict]:
        """Generated prompts as records of GENERATION_COLUMNS, rounded (the Kaggle figure keeps 5 decimals)."""
        return [
            {
                "captioner": f"{r['captioner']} ({r.get('variant', '')})",
                "SBERT cosine (Kaggle metric)": rounded(r["sbert_cosine"]),
                "RefCLIPScore": rounded(r["refclip_score"]),
                "Kaggle first place": rounded(r["kaggle_first_place"], 5),
            }
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
            rows.append([backbone] + [fmt(f"{backbone}/{r}") + paper(backbone, r) for r in RECIPE_TITLES])
        for method in ("median", "mean"):
            rows.append(
                [f"ensemble {method}"]
                + [
                    fmt(f"ensemble/{method}/{r}") + (paper("ensemble", r) if method == "median" else "")
                    for r in RECIPE_TITLES
                ]
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
        ]
        if ZERO_SHOT_KEY in self.cosine:
            lines.append(f"| {self.zero_shot_label()} | {self.cosine[ZERO_SHOT_KEY]:.4f} |")
        lines.append("")
        if self.cosine_by_source:
            lines += ["## Per data source", "", self.by_source_note(), "", self.by_source_markdown()]
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
        """The page reports/evaluation.html: the tables the UI shows (the paper's figures in their own, grey
        columns), the notes, then every figure full width."""
        title = f"reverse-sd evaluation ({self.profile} profile, {self.split} split)"
        sections = [
            f"<h1>{html.escape(title)}</h1>",
            f"<p>Mean cosine between predicted and true all-MiniLM-L6-v2 prompt embeddings on the {self.split} "
            "split of this run; the paper's DiffusionDB figures beside them, for reference only"
            + (" (sample-profile figures are not DiffusionDB figures)." if self.profile == "sample" else ".")
            + "</p>",
            "<h2>Table 1: mean cosine</h2>",
            _html_table(TABLE1_COLUMNS, self.table1_records()),
            "<h2>Baselines</h2>",
            _html_table(BASELINE_COLUMNS, self.baseline_records()),
        ]
        if self.cosine_by_source:
            sections += [
                "<h2>Per data source</h2>",
                f"<p>{html.escape(self.by_source_note())}</p>",
                self.by_source_html(),
            ]
        if self.generation:
            sections += ["<h2>Generated prompts</h2>", _html_table(GENERATION_COLUMNS, self.generation_records())]
        if self.counts:
            sections.append("<p>Pairs: " + html.escape(", ".join(f"{k} {v}" for k, v in self.counts.items())) + "</p>")
        if self.notes:
            sections.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in self.notes) + "</ul>")
        sections += [
            f"<h2>{html.escape(t)}</h2><img alt='{html.escape(t)}' src='{uri}'/>" for t, uri in self.figures.items()
        ]
        return (
            "<!doctype html><html><head><meta charset='utf-8'><title>reverse-sd evaluation</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
            "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:4px 10px}"
            "td.num{text-align:right;font-variant-numeric:tabular-nums}.paper{color:#777}"
            "img{max-width:100%;height:auto}</style></head><body>" + "".join(sections) + "</body></html>"
        )


def fixed(value, digits: int = DIGITS) -> str:
    """A figure with exactly ``digits`` decimals ("0.6590", never "0.659"); "-" for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{float(value):.{digits}f}"


def format_value(value) -> str:
    """A table cell as text: floats with 4 decimals (more when the value has them), "-" for a missing one."""
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:.{DIGITS}f}"
        return text if float(text) == value else repr(value)
    return str(value)


def _html_table(columns: list[tuple[str, str]], records: list[dict]) -> str:
    def cell(name: str, kind: str, value) -> str:
        classes = " ".join(c for c in ("num" if kind == "float" else "", "paper" if "paper" in name else "") if c)
        attribute = f" class='{classes}'" if classes else ""
        return f"<td{attribute}>{html.escape(format_value(value))}</td>"

    head = "".join(f"<th>{html.escape(name)}</th>" for name, _ in columns)
    body = "".join(
        "<tr>" + "".join(cell(name, kind, record.get(name)) for name, kind in columns) + "</tr>" for record in records
    )
    return f"<table><tr>{head}</tr>{body}</table>"
