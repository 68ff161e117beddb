"""The code location loads, and the graph has the asset keys ARCHITECTURE.md names."""

from __future__ import annotations

import os
import subprocess
import sys

import dagster as dg
import pytest
from conftest import PROJECT

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


def test_captioners_setting_chooses_the_captioner_partitions():
    """REVERSE_SD_CAPTIONERS (BLIP-2 is opt-in) decides the partitions of the generation assets."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "from assets.generation import trained_captioners as a; print(','.join(a.partitions_def.get_partition_keys()))"
    )
    env = {**os.environ, "REVERSE_SD_CAPTIONERS": "blip2,blip", "REVERSE_SD_PROFILE": "sample"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1] == "blip2,blip"
    from assets.generation import trained_captioners

    assert trained_captioners.partitions_def.get_partition_keys() == ["blip"]  # the default


@pytest.mark.parametrize("mode, blocking", [("block", True), ("warn", False)])
def test_the_baseline_check_blocks_or_only_warns_as_set(tmp_path, mode, blocking):
    """REVERSE_SD_BASELINE_CHECK decides whether beats_mean_embedding_baseline blocks (read at load time)."""
    code = (
        "import dagster as dg\n"
        "from assets.definitions import defs\n"
        "graph = defs.resolve_asset_graph()\n"
        "key = dg.AssetCheckKey(dg.AssetKey('model_predictions'), 'beats_mean_embedding_baseline')\n"
        "print('blocking', graph.get_check_spec(key).blocking)\n"
    )
    env = {**os.environ, "REVERSE_SD_BASELINE_CHECK": mode, "REVERSE_SD_HOME": str(tmp_path / "data")}
    env["DAGSTER_HOME"] = str(tmp_path / "dagster_home")
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"blocking {blocking}" in result.stdout
