"""Data-change rebuilds: observe the DiffusionDB source on a schedule, and register new parts.

Dagster starts schedules and sensors STOPPED unless told otherwise; these two start stopped on purpose
(a fresh checkout must not start downloading DiffusionDB).  Turn them on in the UI (Automation tab) or
with `dagster schedule start observe_diffusiondb` / `dagster sensor start diffusiondb_new_parts`.
"""


import os

import dagster as dg

from assets.data import diffusiondb_parts, diffusiondb_source, parts_partitions
from resources import DiffusionDBResource

OBSERVE_CRON = os.environ.get("REVERSE_SD_OBSERVE_CRON", "0 3 * * *")  # daily by default

observe_job = dg.define_asset_job("observe_diffusiondb_source", selection=[diffusiondb_source])

observe_diffusiondb = dg.ScheduleDefinition(
    name="observe_diffusiondb",
    job=observe_job,
    cron_schedule=OBSERVE_CRON,
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Observes diffusiondb_source (hub revision or mirror hash); a new version marks downstream stale.",
)


@dg.sensor(
    name="diffusiondb_new_parts",
    minimum_interval_seconds=3600,
    asset_selection=[diffusiondb_parts],
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Registers DiffusionDB parts the source lists but the graph does not know, and materializes them.",
)
def diffusiondb_new_parts(context: dg.SensorEvaluationContext, diffusiondb: DiffusionDBResource):
    listed = sorted(diffusiondb.source().list_parts())
    known = set(context.instance.get_dynamic_partitions(parts_partitions.name))
    new = [p for p in listed if p not in known]
    if not new:
        return dg.SkipReason(f"no new parts ({len(listed)} listed)")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=p, asset_selection=[diffusiondb_parts.key]) for p in new],
        dynamic_partitions_requests=[parts_partitions.build_add_request(new)],
    )


AUTOMATION = {"schedules": [observe_diffusiondb], "sensors": [diffusiondb_new_parts], "jobs": [observe_job]}
