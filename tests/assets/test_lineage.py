"""Lineage declared once (issue 28): an asset names what it reads in its ``ins`` (the ``tables`` input manager
hands it handles), and the graph is the one it was: the same parents, with the same partition mappings."""

from __future__ import annotations

import dagster as dg

from assets.definitions import ALL_ASSETS, defs
from resources import TableInputManager

# Every asset's parents, as the graph had them when they were declared as deps (issue 28 changed none).
PARENTS = {
    "diffusiondb_source": [],
    "images_source": [],
    "training_settings": [],
    "diffusiondb_parts": ["diffusiondb_source"],
    "image_folders": ["images_source"],
    "filtered_pairs": ["diffusiondb_parts", "image_folders"],
    "prompt_embeddings": ["filtered_pairs"],
    "vocabulary": ["filtered_pairs"],
    "vocabulary_labels": ["filtered_pairs", "vocabulary"],
    "difficulty_scores": ["filtered_pairs", "prompt_embeddings", "training_settings", "vocabulary_labels"],
    "trained_models": [
        "difficulty_scores",
        "filtered_pairs",
        "prompt_embeddings",
        "training_settings",
        "vocabulary",
        "vocabulary_labels",
    ],
    "model_predictions": ["trained_models"],
    "ensemble_predictions": ["model_predictions"],
    "kmeans_centroids": ["ensemble_predictions"],
    "dakl_predictions": ["ensemble_predictions", "kmeans_centroids"],
    "prompt_bank": ["filtered_pairs", "prompt_embeddings"],
    "trained_captioners": [
        "difficulty_scores",
        "filtered_pairs",
        "prompt_embeddings",
        "vocabulary",
        "vocabulary_labels",
    ],
    "caption_predictions": ["filtered_pairs", "prompt_embeddings", "trained_captioners"],
    "unet_swap_report": ["trained_models"],
    "evaluation_report": [
        "caption_predictions",
        "dakl_predictions",
        "difficulty_scores",
        "ensemble_predictions",
        "filtered_pairs",
        "model_predictions",
        "prompt_bank",
        "prompt_embeddings",
    ],
}
# The partition mappings that are not the default one (parent -> mapping), by child.
MAPPINGS = {
    (
        "trained_models",
        "training_settings",
    ): "MultiToSingleDimensionPartitionMapping(partition_dimension_name='backbone')",
    (
        "trained_models",
        "difficulty_scores",
    ): "MultiToSingleDimensionPartitionMapping(partition_dimension_name='backbone')",
    ("trained_captioners", "difficulty_scores"): "AllPartitionMapping()",
    ("unet_swap_report", "trained_models"): (
        "SpecificPartitionsPartitionMapping(partition_keys=['unet|mlc_cl', 'unet|mlc', 'unet|baseline'])"
    ),
}
# Parents that are observed, not read: they stay plain deps.
OBSERVED = {"diffusiondb_source", "images_source", "training_settings"}


def test_graph_parents_and_partition_mappings_are_unchanged():
    graph = defs.resolve_asset_graph()
    parents = {
        k.to_user_string(): sorted(p.to_user_string() for p in graph.get(k).parent_keys)
        for k in graph.get_all_asset_keys()
    }
    assert parents == PARENTS
    for (child, parent), mapping in MAPPINGS.items():
        assert repr(graph.get_partition_mapping(dg.AssetKey(child), dg.AssetKey(parent))) == mapping


def test_each_parent_is_named_once_and_read_through_the_tables_input_manager():
    """A parent an asset reads is one of its ins (loaded by the tables input manager); only observed sources
    remain plain deps; nothing is both."""
    graph = defs.resolve_asset_graph()
    for asset in ALL_ASSETS:
        if not isinstance(asset, dg.AssetsDefinition) or not asset.is_executable or not asset.op.input_defs:
            continue
        read, plain = set(), set()
        for input_def in asset.op.input_defs:
            parent = asset.keys_by_input_name[input_def.name].to_user_string()
            if input_def.dagster_type.is_nothing:
                plain.add(parent)
            else:
                assert input_def.input_manager_key == "tables", (asset.key, input_def.name)
                read.add(parent)
        (key,) = asset.keys
        assert not read & plain, key
        assert read | plain == {p.to_user_string() for p in graph.get(key).parent_keys}, key
        assert plain <= OBSERVED, (key, plain)


def test_the_tables_input_manager_is_registered_on_the_storage_root():
    manager = defs.resources["tables"]
    assert isinstance(manager, TableInputManager)
    assert manager.storage.root == defs.resources["storage"].root
