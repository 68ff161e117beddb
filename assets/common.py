"""Shared wiring helpers: the active settings, code versions that include result-changing config,
and Markdown rendering for UI metadata."""

from __future__ import annotations

import hashlib
import json
import os

from resources import load_settings, profile_config

SETTINGS = load_settings()
OBSERVE_CRON = os.environ.get("REVERSE_SD_OBSERVE_CRON", "0 3 * * *")  # when sources are observed (daily)
PROFILE_CONFIG = profile_config(SETTINGS)

# Bump an entry when the code of that stage changes what it computes.
CODE_REVISIONS = {
    "diffusiondb_parts": 1,
    "filtered_pairs": 1,
    "prompt_embeddings": 1,
    "vocabulary": 2,  # 2: words of two or more letters (was three)
    "vocabulary_labels": 2,
    "difficulty_scores": 2,  # 2: heads start from the data's prior
    "training_settings": 1,
    "trained_models": 2,  # 2: heads from the data's prior, best-val epoch kept
    "model_predictions": 1,
    "ensemble_predictions": 1,
    "kmeans_centroids": 1,
    "dakl_predictions": 1,
    "evaluation_report": 2,  # 2: k-NN on CLIP features, generated-prompt rows
    "prompt_bank": 1,
    "trained_captioners": 1,
    "caption_predictions": 1,
    "unet_swap_report": 1,
}


def code_version(stage: str, **config) -> str:
    """'v<revision>-<hash of config>': a setting that changes results makes the asset stale in the UI."""
    payload = json.dumps(config, sort_keys=True, default=str)
    digest = hashlib.sha1(payload.encode()).hexdigest()[:10]
    return f"v{CODE_REVISIONS[stage]}-{digest}"


def _cell(value) -> str:
    if isinstance(value, float):
        text = f"{value:.4f}"
    elif isinstance(value, (bytes, bytearray)):
        text = f"<{len(value)} bytes>"
    else:
        text = str(value)
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 120 else text[:117] + "..."


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "_(empty)_"
    headers = list(rows[0].keys())
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(_cell(row.get(h)) for h in headers) + " |" for row in rows]
    return "\n".join(lines)
