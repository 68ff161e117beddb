"""The Definitions object: every asset, check, resource, schedule and sensor of reverse-sd."""

from __future__ import annotations

import dagster as dg

from assets.artifacts import damaged_artifacts
from assets.automation import AUTOMATION, with_rebuild_conditions
from assets.common import SETTINGS
from assets.data import DATA_ASSETS, DATA_CHECKS
from assets.ensemble import ENSEMBLE_ASSETS
from assets.evaluation import EVALUATION_ASSETS
from assets.generation import GENERATION_ASSETS
from assets.jobs import stage_jobs
from assets.own_images import IMAGES_ASSETS
from assets.training import TRAINING_ASSETS, TRAINING_CHECKS, training_settings
from resources import build_resources, with_tables

ALL_ASSETS = [*IMAGES_ASSETS, *DATA_ASSETS, *TRAINING_ASSETS, *ENSEMBLE_ASSETS, *EVALUATION_ASSETS, *GENERATION_ASSETS]
ALL_CHECKS = [*DATA_CHECKS, *TRAINING_CHECKS]
# The jobs `reverse-sd materialize` runs (one per partitions definition), and the settings observation (it
# observes the parts with the observe schedule's job).
CLI_JOBS = [*stage_jobs(ALL_ASSETS), dg.define_asset_job("observe_settings", selection=[training_settings])]


def build_definitions(executor: dg.ExecutorDefinition) -> dg.Definitions:
    """The whole graph with ``executor``: the one place that lists what a code location holds, so a
    deployment that only swaps the executor (deploy/k8s/definitions.py) cannot miss a piece."""
    return dg.Definitions(
        executor=executor,
        assets=with_rebuild_conditions(ALL_ASSETS),
        asset_checks=ALL_CHECKS,
        resources=with_tables(build_resources(SETTINGS)),
        jobs=[*AUTOMATION["jobs"], *CLI_JOBS],
        schedules=AUTOMATION["schedules"],
        sensors=[*AUTOMATION["sensors"], damaged_artifacts],
    )


# Each run executes its steps in its own process, one after another (the in-process executor): a run is one
# process that imports the code once, instead of one more process (and import) per step.  Parallelism comes
# from runs (the queue, `reverse-sd materialize`'s plan, backfills); deploy/k8s/ swaps in a step executor.
defs = build_definitions(dg.in_process_executor)
