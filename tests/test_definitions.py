"""The code location loads, and the graph has the asset keys ARCHITECTURE.md names."""

from __future__ import annotations

import dagster as dg

from assets.definitions import defs


def test_definitions_load():
    dg.Definitions.validate_loadable(defs)


def test_asset_keys_present():
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    expected = {
        "diffusiondb_source",
        "diffusiondb_parts",
        "filtered_pairs",
        "prompt_embeddings",
        "vocabulary",
        "vocabulary_labels",
        "difficulty_scores",
        "trained_models",
        "model_predictions",
        "ensemble_predictions",
        "kmeans_centroids",
        "dakl_predictions",
        "evaluation_report",
        "prompt_bank",
    }
    assert expected <= keys


def test_code_versions_follow_config():
    from assets.common import code_version

    assert code_version("filtered_pairs", ratios=(80, 10, 10)) != code_version("filtered_pairs", ratios=(670, 30, 30))
    assert code_version("filtered_pairs", ratios=(80, 10, 10)) == code_version("filtered_pairs", ratios=(80, 10, 10))
