"""Declarative automation (assets/automation.py) evaluated on a test instance with recorded events: no
compute runs, only what the automation sensor would request."""

from __future__ import annotations

import uuid

import dagster as dg

from assets.automation import REBUILD_LABEL
from assets.definitions import defs

PART = "diffusiondb_part"
CHECK = dg.AssetCheckKey(dg.AssetKey("model_predictions"), "beats_mean_embedding_baseline")


def _graph():
    return defs.resolve_asset_graph()


def _report_everything(instance: dg.DagsterInstance, check_passed: bool = True) -> None:
    """A fully materialized graph: every partition of every asset, and the blocking check's verdict."""
    graph = _graph()
    for key in graph.materializable_asset_keys:
        pdef = graph.get(key).partitions_def
        keys = pdef.get_partition_keys(dynamic_partitions_store=instance) if pdef else [None]
        for partition in keys:
            _report(instance, key.to_user_string(), partition)
    if not check_passed:
        _report_check(instance, check_passed)
    _observe_settings(instance)


def _observe_settings(instance: dg.DagsterInstance, versions: dict[str, str] | None = None) -> None:
    """training_settings observed, as `reverse-sd materialize` and the daily observation record it."""
    for backbone in ("vit", "swin", "clip", "unet"):
        instance.report_runless_asset_event(
            dg.AssetObservation(
                asset_key="training_settings",
                partition=backbone,
                tags={"dagster/data_version": (versions or {}).get(backbone, "v1")},
            )
        )


def _report_check(
    instance: dg.DagsterInstance, passed: bool, check: dg.AssetCheckKey = CHECK, partition: str | None = None
) -> None:
    """A check evaluation; the model check is per model partition (unet|baseline unless told)."""
    if partition is None and check == CHECK:
        partition = "unet|baseline"
    target = None
    if partition is not None:  # a partitioned check's result counts for the materialization it checked
        from dagster._core.definitions.asset_checks.asset_check_evaluation import (  # test-only: no public twin
            AssetCheckEvaluationTargetMaterializationData,
        )

        record = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=check.asset_key, asset_partitions=[partition]), limit=1
        ).records[0]
        target = AssetCheckEvaluationTargetMaterializationData(
            storage_id=record.storage_id, run_id=record.run_id, timestamp=record.timestamp
        )
    evaluation = dg.AssetCheckEvaluation(
        asset_key=check.asset_key,
        check_name=check.name,
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        partition=partition,
        target_materialization_data=target,
    )
    if partition is None:
        instance.report_runless_asset_event(evaluation)
        return
    # Runless evaluations of one partition would collide on Dagster's (check, run id, partition) key: each
    # gets its own run id, as real runs do.
    instance.report_dagster_event(
        dg.DagsterEvent(
            event_type_value=dg.DagsterEventType.ASSET_CHECK_EVALUATION.value,
            job_name="__test__",
            event_specific_data=evaluation,
        ),
        run_id=str(uuid.uuid4()),
    )


def _report(instance: dg.DagsterInstance, name: str, partition: str | None) -> None:
    """A materialization as a run records it: the asset, then its (passing) checks."""
    key = dg.AssetKey(name)
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=key, partition=partition))
    for check in _graph().get_check_keys_for_assets({key}):
        _report_check(instance, True, check, partition if check == CHECK else None)


def _requested(result) -> dict[str, set]:
    out = {}
    for key in _graph().materializable_asset_keys:
        if result.get_num_requested(key):
            out[key.to_user_string()] = set(result.get_requested_partitions(key))
    return out


def test_every_asset_downstream_of_the_parts_carries_the_rebuild_condition():
    graph = _graph()
    conditions = {k.to_user_string(): graph.get(k).automation_condition for k in graph.materializable_asset_keys}
    assert conditions.pop("diffusiondb_parts") is None  # requested by the diffusiondb_new_parts sensor
    assert conditions.pop("image_folders") is None  # requested by the images_new_folders sensor
    assert all(c is not None and c.get_label() == REBUILD_LABEL for c in conditions.values()), conditions
    sensors = {s.name: s for s in defs.sensors}
    assert sensors["reverse_sd_automation"].default_status == dg.DefaultSensorStatus.STOPPED


def _run_ticks(instance, cursor, max_ticks: int = 20) -> list[dict[str, set]]:
    """Tick the automation until it requests nothing, "running" each tick's requests by recording their
    materializations (and a passing check); returns what each tick requested."""
    ticks = []
    for _ in range(max_ticks):
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
        cursor = result.cursor
        requested = _requested(result)
        if not requested:
            return ticks
        ticks.append(requested)
        for name, partitions in requested.items():
            for partition in partitions:
                _report(instance, name, partition)
    raise AssertionError(f"automation still requesting after {max_ticks} ticks: {ticks[-1]}")


def test_new_part_rebuilds_its_downstream_once_in_graph_order():
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(PART, ["part-000001", "part-000002"])
        _report_everything(instance)
        first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        assert first.total_requested == 0  # a fresh graph stays put

        instance.add_dynamic_partitions(PART, ["part-000003"])
        _report(instance, "diffusiondb_parts", "part-000003")
        ticks = _run_ticks(instance, first.cursor)
        when = {}
        for i, requested in enumerate(ticks):
            for name, partitions in requested.items():
                for partition in partitions:
                    assert (name, partition) not in when, f"{name}[{partition}] requested twice: {ticks}"
                    when[(name, partition)] = i
        names = {name for name, _ in when}
        assert "diffusiondb_parts" not in names  # the old parts are not read again
        graph = _graph()
        # everything but the two sources' partitioned assets (image_folders is the other source, not fed by parts)
        downstream = {k.to_user_string() for k in graph.materializable_asset_keys} - {
            "diffusiondb_parts",
            "image_folders",
        }
        assert names == downstream, (downstream - names, names - downstream)  # everything the parts feed, once
        assert {p for n, p in when if n == "trained_models"} == set(
            graph.get(dg.AssetKey("trained_models")).partitions_def.get_partition_keys()
        )
        # Graph order: nothing is requested in an earlier tick than a parent it reads (requests of one tick
        # go out as one backfill, which runs them in dependency order).
        for (name, _partition), tick in when.items():
            for parent in graph.get(dg.AssetKey(name)).parent_keys:
                parent_ticks = [w for (n, _), w in when.items() if n == parent.to_user_string()]
                assert all(tick >= w for w in parent_ticks), (name, parent)
        # The report waits for the models: it is not built on the new pairs with the old predictions.
        assert when[("evaluation_report", None)] >= max(w for (n, _), w in when.items() if n == "model_predictions")
        assert when[("evaluation_report", None)] > when[("filtered_pairs", None)]


def test_settings_are_observed_once_on_a_new_instance():
    with dg.instance_for_test() as instance:
        result = dg.evaluate_automation_conditions(
            defs=defs, instance=instance, asset_selection=dg.AssetSelection.assets("training_settings")
        )
        assert result.get_num_requested(dg.AssetKey("training_settings")) == 4
        _observe_settings(instance)
        again = dg.evaluate_automation_conditions(
            defs=defs,
            instance=instance,
            cursor=result.cursor,
            asset_selection=dg.AssetSelection.assets("training_settings"),
        )
        assert again.total_requested == 0


def test_failed_blocking_check_stops_the_rebuild_below_it():
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(PART, ["part-000001"])
        _report_everything(instance, check_passed=True)
        first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        assert first.total_requested == 0
        # One model retrained, and its check now fails: the ensemble must not be rebuilt on top of it.
        instance.report_runless_asset_event(
            dg.AssetMaterialization(asset_key="model_predictions", partition="unet|baseline")
        )
        _report_check(instance, passed=False)
        blocked = _requested(dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor))
        assert "ensemble_predictions" not in blocked
        # ...and when it passes again, the ensemble is rebuilt.
        instance.report_runless_asset_event(
            dg.AssetMaterialization(asset_key="model_predictions", partition="unet|baseline")
        )
        _report_check(instance, passed=True)
        second = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
        assert "ensemble_predictions" in _requested(second)


def test_new_parts_sensor_registers_them_and_requests_ranged_runs_that_materialize_each_part(tmp_path):
    """diffusiondb_new_parts: new parts become partitions and ranged runs of at most MAX_PARTS_PER_RUN parts,
    which, run as the daemon runs them (their tags on a run of the parts' job), materialize every part."""
    from assets.automation import diffusiondb_new_parts, part_run_requests
    from assets.data import diffusiondb_parts, diffusiondb_source
    from pipeline.data.sample_data import generate_sample_mirror
    from resources.core import DiffusionDBResource, StorageResource

    mirror = tmp_path / "mirror"
    generate_sample_mirror(mirror, n_parts=3, images_per_part=2, image_size=64)
    resources = {
        "diffusiondb": DiffusionDBResource(location=str(mirror)),
        "storage": StorageResource(root=str(tmp_path)),
    }
    parts = ["part-000001", "part-000002", "part-000003"]
    assert [(r.partition_key, r.tags) for r in part_run_requests(parts, per_run=2)] == [
        (
            None,
            {"dagster/asset_partition_range_start": "part-000001", "dagster/asset_partition_range_end": "part-000002"},
        ),
        ("part-000003", {}),
    ]
    with dg.instance_for_test() as instance:
        result = diffusiondb_new_parts(dg.build_sensor_context(instance=instance, resources=resources))
        assert [r.partition_keys for r in result.dynamic_partitions_requests] == [parts]
        (request,) = result.run_requests  # one ranged run for three parts
        for event in result.asset_events:  # as the daemon does: the sources' versions, the partitions, the run
            instance.report_runless_asset_event(event)
        assert sorted(e.partition for e in result.asset_events) == parts
        instance.add_dynamic_partitions(PART, parts)
        run = dg.materialize(
            [diffusiondb_source, diffusiondb_parts],
            selection=request.asset_selection,
            partition_key=request.partition_key,
            tags=request.tags,
            instance=instance,
            resources=resources,
        )
        assert run.success
        records = instance.fetch_materializations(dg.AssetKey("diffusiondb_parts"), limit=10).records
        assert sorted(r.asset_materialization.partition for r in records) == parts
        assert all(r.asset_materialization.metadata["records"].value == 2 for r in records)
        again = diffusiondb_new_parts(dg.build_sensor_context(instance=instance, resources=resources))
        assert isinstance(again, dg.SkipReason)
        # The parts read their observed source versions, so the next observation records nothing new for them
        # and nothing is stale (without the sensor's observations, all three would be ingested twice).
        from assets.data import changed_part_versions
        from cli.planning import plan_units

        listed = resources["diffusiondb"].source().list_parts()
        assert changed_part_versions(instance, listed) == {}
        root = resources["storage"].root  # this test's root, not the one the environment configures
        assert plan_units(defs, instance, selection="diffusiondb_parts", stale_only=True, storage_root=root).units == []


def _stale_plan(instance) -> dict[str, set]:
    """What `reverse-sd materialize --stale` would run (asset -> partitions), and what it leaves out."""
    from cli.planning import plan_units

    plan = plan_units(defs, instance, stale_only=True)
    planned: dict[str, set] = {}
    for unit in plan.units:
        for key in unit.asset_keys:
            planned.setdefault(key.to_user_string(), set()).update(unit.partition_keys)
    return planned, plan.blocked


def _report_run(instance, graph, name: str, partition: str | None) -> None:
    """A materialization tagged as a real run tags it (code version, and the newest event of each parent it
    read), then its passing checks: the state `--stale` judges from."""
    key = dg.AssetKey(name)
    tags = {"dagster/data_version": uuid.uuid4().hex[:8]}  # every run records one (Dagster derives it)
    if graph.get(key).code_version:
        tags["dagster/code_version"] = graph.get(key).code_version
    for parent in graph.get(key).parent_keys:
        fetch = instance.fetch_materializations if graph.get(parent).is_materializable else instance.fetch_observations
        records = fetch(parent, limit=1).records
        if records:
            tags[f"dagster/input_event_pointer/{parent.to_user_string()}"] = str(records[0].storage_id)
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=key, partition=partition, tags=tags))
    for check in graph.get_check_keys_for_assets({key}):
        _report_check(instance, True, check, partition if check == CHECK else None)


def _build_everything(instance, graph) -> None:
    instance.report_runless_asset_event(
        dg.AssetObservation(
            asset_key="diffusiondb_source", partition="part-000001", tags={"dagster/data_version": "z1"}
        )
    )
    _observe_settings(instance)
    for level in graph.toposorted_asset_keys_by_level:
        for key in sorted(level):
            if not graph.get(key).is_materializable:
                continue
            pdef = graph.get(key).partitions_def
            for partition in pdef.get_partition_keys(dynamic_partitions_store=instance) if pdef else [None]:
                _report_run(instance, graph, key.to_user_string(), partition)


def test_stale_and_the_sensor_agree_after_a_failed_blocking_check_and_both_say_so():
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(PART, ["part-000001"])
        _build_everything(instance, _graph())
        first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        assert _stale_plan(instance) == ({}, {})
        # model_predictions[unet|baseline] rebuilt, and its blocking check fails
        _report_run(instance, _graph(), "model_predictions", "unet|baseline")
        _report_check(instance, passed=False)
        sensor = _requested(dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor))
        planned, blocked = _stale_plan(instance)
        assert "ensemble_predictions" not in sensor and "ensemble_predictions" not in planned
        assert "evaluation_report" not in planned
        assert blocked[(dg.AssetKey("ensemble_predictions"), None)] == (
            "check beats_mean_embedding_baseline failed on model_predictions[unet|baseline]"
        )


def test_stale_and_the_sensor_agree_after_a_code_version_bump():
    """A bumped code_version is stale for --stale and requested by the automation sensor."""
    import assets.definitions as definitions

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(PART, ["part-000001"])
        _build_everything(instance, _graph())
        first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        assert _stale_plan(instance)[0] == {}
        bumped = dg.Definitions(
            assets=[
                a.map_asset_specs(lambda spec: spec.replace_attributes(code_version=(spec.code_version or "") + "+1"))
                if isinstance(a, dg.AssetsDefinition) and dg.AssetKey("vocabulary") in a.keys
                else a
                for a in definitions.defs.assets
            ],
            asset_checks=definitions.defs.asset_checks,
            resources=definitions.defs.resources,
            jobs=definitions.defs.jobs,
            sensors=definitions.defs.sensors,
            schedules=definitions.defs.schedules,
        )
        from cli.planning import plan_units

        sensor = dg.evaluate_automation_conditions(defs=bumped, instance=instance, cursor=first.cursor)
        requested = {k.to_user_string() for k in bumped.resolve_asset_graph().materializable_asset_keys}
        requested = {n for n in requested if sensor.get_num_requested(dg.AssetKey(n))}
        plan = plan_units(bumped, instance, stale_only=True)
        planned = {k.to_user_string() for u in plan.units for k in u.asset_keys}
        assert "vocabulary" in requested and "vocabulary" in planned, (requested, planned)


def _report_built_file(instance, graph, name: str, path) -> None:
    """A run of ``name`` (as _report_run records it) that wrote ``path``: its materialization names the file."""
    _report_run(instance, graph, name, None)
    latest = instance.fetch_materializations(dg.AssetKey(name), limit=1).records[0]
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key=name, tags=latest.asset_materialization.tags, metadata={"path": dg.MetadataValue.path(str(path))}
        )
    )


def test_stale_and_the_sensors_agree_after_a_garbled_artifact(tmp_path):
    """A truncated file: --stale rebuilds its partition and what reads it; the damaged_artifacts sensor requests
    that partition (once per damaged materialization), and once it is rebuilt the automation sensor goes on
    to what reads it."""
    import polars as pl

    from assets.artifacts import damaged_artifacts
    from cli.planning import plan_units
    from pipeline import storage
    from resources import StorageResource

    graph = _graph()
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(PART, ["part-000001"])
        _build_everything(instance, graph)
        target = tmp_path / "vocabulary.parquet"
        storage.write_parquet(pl.DataFrame({"word": ["cat", "dog"] * 200}), target)
        _report_built_file(instance, graph, "vocabulary", target)
        for name in ("vocabulary_labels", "trained_models"):  # what reads it, rebuilt after it
            pdef = graph.get(dg.AssetKey(name)).partitions_def
            for partition in pdef.get_partition_keys() if pdef else [None]:
                _report_run(instance, graph, name, partition)
        root = str(tmp_path)
        first = dg.evaluate_automation_conditions(defs=defs, instance=instance)

        def sensor():
            context = dg.build_sensor_context(
                instance=instance,
                resources={"storage": StorageResource(root=root)},
                repository_def=defs.get_repository_def(),
            )
            return damaged_artifacts(context)

        def stale():
            plan = plan_units(defs, instance, selection="vocabulary*", stale_only=True, storage_root=root)
            return plan, {k.to_user_string() for u in plan.units for k in u.asset_keys}

        assert isinstance(sensor(), dg.SkipReason)
        assert "vocabulary" not in stale()[1]

        target.write_bytes(target.read_bytes()[:100])  # truncated
        requests = sensor()
        assert [(r.asset_selection, r.partition_key) for r in requests] == [([dg.AssetKey("vocabulary")], None)]
        assert requests[0].run_key == sensor()[0].run_key  # asked again next tick: Dagster skips the same key
        plan, planned = stale()
        assert plan.reasons[0] == f"vocabulary: artifact damaged: {target}"
        assert {"vocabulary", "vocabulary_labels"} <= planned

        storage.write_parquet(pl.DataFrame({"word": ["cat", "dog"] * 200}), target)  # the requested rebuild
        _report_built_file(instance, graph, "vocabulary", target)
        assert isinstance(sensor(), dg.SkipReason)
        after = _requested(dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor))
        assert "vocabulary_labels" in after and "vocabulary_labels" in planned
