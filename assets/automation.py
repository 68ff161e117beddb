"""Data-change rebuilds: observe the sources on a schedule, register and read new parts, and rebuild
what they feed.

- observe_diffusiondb (schedule, daily by default, REVERSE_SD_OBSERVE_CRON): observes diffusiondb_source,
  one data version per part; a changed part shows as stale data downstream of that part.
- diffusiondb_new_parts (sensor): registers parts the source lists but the graph does not know, and
  materializes exactly those partitions of diffusiondb_parts, in ranged runs of up to 50 parts.
- reverse_sd_automation (declarative automation sensor): every asset downstream of diffusiondb_parts
  carries rebuild_condition(), eager() on its deepest parents plus "blocking checks of the parents
  passed": it is requested once when what it reads is updated (never while a parent is still in progress
  or missing), and the requests of one tick go out as one backfill, so stages run in graph order and
  training starts once per data change, not once per updated parent.  A failed blocking check (e.g. a
  model below the mean-embedding baseline) stops the rebuild there.  training_settings is observed once
  on a new instance and then daily, so a UI-only deployment trains too.

Dagster starts schedules and sensors STOPPED unless told otherwise; all three start stopped on purpose (a
fresh checkout must not start downloading DiffusionDB or training).  Turn them on in the UI (Automation
tab) or with `dagster schedule start observe_diffusiondb`, `dagster sensor start diffusiondb_new_parts`
and `dagster sensor start reverse_sd_automation`.
"""

import dagster as dg

from assets.common import OBSERVE_CRON
from assets.data import MAX_PARTS_PER_RUN, PARTS, diffusiondb_parts, diffusiondb_source, part_changes
from assets.jobs import RANGE_END_TAG, RANGE_START_TAG
from assets.own_images import images_new_folders, observe_images_job
from assets.training import training_settings
from resources import DiffusionDBResource

# One job per partitions definition (an asset job cannot mix them): the parts' versions here; training_settings
# observes itself daily through its automation condition, and `reverse-sd materialize` observes both.
observe_job = dg.define_asset_job("observe_diffusiondb_source", selection=[diffusiondb_source])

observe_diffusiondb = dg.ScheduleDefinition(
    name="observe_diffusiondb",
    job=observe_job,
    cron_schedule=OBSERVE_CRON,
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Observes diffusiondb_source (each part's zip sha256, the hub's or the mirror's); "
    "a changed part marks itself and what reads it stale.",
)


@dg.sensor(
    name="diffusiondb_new_parts",
    minimum_interval_seconds=3600,
    asset_selection=[diffusiondb_parts],
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Registers DiffusionDB parts the source lists but the graph does not know, and materializes them; "
    "unregisters parts the source no longer lists.",
)
def diffusiondb_new_parts(context: dg.SensorEvaluationContext, diffusiondb: DiffusionDBResource):
    listed = diffusiondb.source().list_parts()
    new, gone = part_changes(context.instance, listed)
    if not new and not gone:
        return dg.SkipReason(f"no new or vanished parts ({len(listed)} listed)")
    if gone:  # the same rule as `reverse-sd materialize`: a part the source no longer lists is unregistered
        context.log.warning(f"unregistering {len(gone)} parts the source no longer lists: {gone[:10]}")
    return PARTS.sensor_result(listed, new, gone, new, part_run_requests(new) if new else [])


def part_run_requests(parts: list[str], per_run: int = MAX_PARTS_PER_RUN) -> list[dg.RunRequest]:
    """Runs for newly registered parts (consecutive in registration order): one ranged run per ``per_run``
    parts, as the parts' BackfillPolicy allows, so 2,000 new parts are 40 runs, not 2,000."""
    requests = []
    for start in range(0, len(parts), per_run):
        chunk = parts[start : start + per_run]
        if len(chunk) == 1:
            requests.append(dg.RunRequest(partition_key=chunk[0], asset_selection=[diffusiondb_parts.key]))
        else:
            requests.append(
                dg.RunRequest(
                    asset_selection=[diffusiondb_parts.key],
                    tags={RANGE_START_TAG: chunk[0], RANGE_END_TAG: chunk[-1]},
                )
            )
    return requests


REBUILD_LABEL = "rebuild: eager on the deepest parents, after blocking checks"


def rebuild_condition(ignored: frozenset = frozenset()) -> dg.AutomationCondition:
    """eager() that waits for the parents' blocking checks and ignores updates of ``ignored`` parents
    (see _shadowed_parents)."""
    eager = dg.AutomationCondition.eager()
    if ignored:
        eager = eager.replace(
            "any_deps_updated", dg.AutomationCondition.any_deps_updated().ignore(dg.AssetSelection.assets(*ignored))
        )
    # A code version bump rebuilds too, as `reverse-sd materialize --stale` does (one rebuild rule).
    eager = eager | (
        dg.AutomationCondition.code_version_changed()
        & ~dg.AutomationCondition.in_progress()
        & ~dg.AutomationCondition.any_deps_missing()
    ).with_label("code version changed")
    # A partitioned check (model_predictions' baseline check, per model) counts for a dependency when any of its
    # partitions passed; a failed partition must still block, so no dependency partition may have failed one.
    no_failed_check = ~dg.AutomationCondition.any_deps_match(
        dg.AutomationCondition.any_checks_match(dg.AutomationCondition.check_failed(), blocking_only=True)
    )
    return (eager & dg.AutomationCondition.all_deps_blocking_checks_passed() & no_failed_check).with_label(
        REBUILD_LABEL
    )


# Everything fed by the parts; the parts themselves are requested by diffusiondb_new_parts.
REBUILT = dg.AssetSelection.assets(diffusiondb_parts).downstream(include_self=False)

rebuild_sensor = dg.AutomationConditionSensorDefinition(
    "reverse_sd_automation",
    target=REBUILT | dg.AssetSelection.assets(training_settings.key),
    default_status=dg.DefaultSensorStatus.STOPPED,
    minimum_interval_seconds=60,
    description="Rebuilds what new or changed DiffusionDB parts feed (rebuild_condition()), one backfill per tick.",
)


def _shadowed_parents(parents: dict) -> dict:
    """key -> the direct parents whose updates also reach it through a deeper parent.

    A parent P is shadowed by another parent Q that is deeper in the graph and shares an ancestor with P
    (or has P as an ancestor): what updates P also updates Q later, so reacting to P would run the asset
    early on half-updated inputs and then again.  evaluation_report thus reacts to dakl_predictions, not
    to prompt_bank or model_predictions; trained_models to difficulty_scores and training_settings.
    """
    ancestors: dict = {}
    depth: dict = {}

    def ancestors_of(key):
        if key not in ancestors:
            ancestors[key] = set()
            for parent in parents.get(key, ()):
                ancestors[key] |= {parent} | ancestors_of(parent)
        return ancestors[key]

    def depth_of(key):
        if key not in depth:
            depth[key] = 1 + max((depth_of(p) for p in parents.get(key, ())), default=-1)
        return depth[key]

    def shadows(q, p):
        return depth_of(q) > depth_of(p) and bool(({p} | ancestors_of(p)) & ancestors_of(q))

    return {key: frozenset(p for p in ps if any(shadows(q, p) for q in ps if q != p)) for key, ps in parents.items()}


def with_rebuild_conditions(assets: list) -> list:
    """The assets with rebuild_condition() on every one downstream of diffusiondb_parts (one place, not per asset)."""
    defs_only = [a for a in assets if isinstance(a, dg.AssetsDefinition)]
    parents = {k: set(deps) for a in defs_only for k, deps in a.asset_deps.items()}
    keys: set[dg.AssetKey] = set()
    frontier = {diffusiondb_parts.key}
    while frontier:  # everything that reads diffusiondb_parts, directly or not
        frontier = {k for k, ps in parents.items() if ps & (frontier | keys)} - keys
        keys |= frontier
    shadowed = _shadowed_parents(parents)

    def condition(spec: dg.AssetSpec) -> dg.AssetSpec:
        if spec.key not in keys:
            return spec
        return spec.replace_attributes(automation_condition=rebuild_condition(shadowed[spec.key]))

    return [a.map_asset_specs(condition) if isinstance(a, dg.AssetsDefinition) else a for a in assets]


AUTOMATION = {
    "schedules": [observe_diffusiondb],
    "sensors": [diffusiondb_new_parts, images_new_folders, rebuild_sensor],
    "jobs": [observe_job, observe_images_job],
}
