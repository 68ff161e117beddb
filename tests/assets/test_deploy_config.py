"""The shared-deployment files under deploy/ are valid and say what deploy/README.md claims.

- every YAML file parses;
- deploy/postgres/dagster.yaml is a valid Dagster instance config, takes every credential from the
  environment, and keeps the project's run queue and "gpu" pool;
- deploy/k8s/executor.yaml validates against dagster-k8s's k8s_job_executor schema, gives every asset in
  the "gpu" pool (and only those) an nvidia.com/gpu request and limit, and the step Job dagster-k8s builds
  from it really carries them (needs dagster-k8s: skipped without it);
- deploy/k8s/definitions.py loads as a code location with that executor;
- the Helm values point at files and settings that exist.
"""

from __future__ import annotations

import importlib.util
import runpy
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[2]
DEPLOY = PROJECT / "deploy"
GPU = "nvidia.com/gpu"


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def test_every_yaml_file_parses():
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert {f.relative_to(DEPLOY).as_posix() for f in files} >= {
        "postgres/dagster.yaml",
        "k8s/executor.yaml",
        "k8s/values.yaml",
    }
    for path in files:
        docs = list(yaml.safe_load_all(path.read_text()))
        assert docs and all(isinstance(d, dict) and d for d in docs), path


# ---- Postgres instance ---------------------------------------------------------------------------


def test_postgres_instance_config_is_valid(tmp_path, monkeypatch):
    from dagster._core.instance.config import dagster_instance_config

    for name, value in {
        "DAGSTER_PG_HOST": "db.example",
        "DAGSTER_PG_PORT": "5433",
        "DAGSTER_PG_USERNAME": "dagster",
        "DAGSTER_PG_PASSWORD": "secret",
        "DAGSTER_PG_DB": "dagster",
    }.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "dagster.yaml").write_text((DEPLOY / "postgres" / "dagster.yaml").read_text())
    config, custom_class = dagster_instance_config(str(tmp_path))
    assert custom_class is None
    assert set(config["storage"]) == {"postgres"}
    db = _load(DEPLOY / "postgres" / "dagster.yaml")["storage"]["postgres"]["postgres_db"]
    # every connection setting from the environment: no host, user or password in the file
    for key in ("hostname", "port", "username", "password", "db_name"):
        assert set(db[key]) == {"env"} and db[key]["env"].startswith("DAGSTER_PG_"), key
    assert db["scheme"] == "postgresql+psycopg2"


def test_postgres_instance_keeps_the_project_queue_and_gpu_pool():
    shared = _load(DEPLOY / "postgres" / "dagster.yaml")
    local = _load(PROJECT / "dagster.yaml")
    assert shared["concurrency"] == local["concurrency"]
    assert shared["run_coordinator"] == local["run_coordinator"]


def test_postgres_storage_classes_resolve():
    pytest.importorskip("dagster_postgres", reason="dagster-postgres is not installed: pip install -e '.[deploy]'")
    from dagster_postgres import (
        DagsterPostgresStorage,
        PostgresEventLogStorage,
        PostgresRunStorage,
        PostgresScheduleStorage,
    )

    assert all([DagsterPostgresStorage, PostgresRunStorage, PostgresEventLogStorage, PostgresScheduleStorage])


# ---- Kubernetes executor -------------------------------------------------------------------------


EXECUTORS = ["executor.yaml", "executor-multi-gpu.yaml"]


def _executor_config(name: str = "executor.yaml") -> dict:
    return _load(DEPLOY / "k8s" / name)["execution"]["config"]


def _gpu_ops() -> set[str]:
    """Op names of the assets in the "gpu" concurrency pool: the ones that need a GPU on a cluster."""
    from assets.definitions import defs

    graph = defs.resolve_asset_graph()
    ops = set()
    for key in graph.materializable_asset_keys:
        op = graph.assets_def_for_key(key).op
        if op.pool == "gpu":
            ops.add(op.name)
    return ops


@pytest.mark.parametrize("name", EXECUTORS)
def test_every_gpu_pool_asset_requests_a_gpu(name):
    config = _executor_config(name)
    per_step = config["per_step_k8s_config"]
    gpu_ops = _gpu_ops()
    assert gpu_ops >= {"trained_models", "difficulty_scores"}
    with_gpu = {
        op
        for op, cfg in per_step.items()
        if GPU in cfg.get("container_config", {}).get("resources", {}).get("requests", {})
    }
    assert with_gpu == gpu_ops, f"GPU steps {sorted(with_gpu)} vs assets in the gpu pool {sorted(gpu_ops)}"
    from assets.definitions import defs

    graph = defs.resolve_asset_graph()
    op_names = {graph.assets_def_for_key(k).op.name for k in graph.materializable_asset_keys}
    assert set(per_step) <= op_names, f"per_step_k8s_config names unknown steps: {set(per_step) - op_names}"
    for op in gpu_ops:
        resources = per_step[op]["container_config"]["resources"]
        assert resources["requests"][GPU] == resources["limits"][GPU] and int(resources["requests"][GPU]) >= 1
    base = config["step_k8s_config"]["container_config"]["resources"]
    assert GPU not in base.get("requests", {}) and GPU not in base.get("limits", {})


def test_multi_gpu_step_runs_torchrun_over_its_gpus(monkeypatch):
    """The multi-GPU file's trained_models pod has N GPUs and REVERSE_SD_NPROC_PER_NODE, which the
    project's compute resource turns into N torchrun processes (N = the visible GPUs for "gpus")."""
    step = _executor_config("executor-multi-gpu.yaml")["per_step_k8s_config"]["trained_models"]["container_config"]
    env = {e["name"]: e["value"] for e in step["env"]}
    assert env["REVERSE_SD_NPROC_PER_NODE"] == "gpus" and int(step["resources"]["limits"][GPU]) > 1
    from resources import build_resources, load_settings

    monkeypatch.setenv("REVERSE_SD_NPROC_PER_NODE", step["resources"]["limits"][GPU])
    assert build_resources(load_settings())["compute"].nproc_per_node == int(step["resources"]["limits"][GPU])


@pytest.mark.parametrize("name", EXECUTORS)
def test_executor_config_validates_against_dagster_k8s(name):
    pytest.importorskip("dagster_k8s", reason="dagster-k8s is not installed: pip install -e '.[deploy]'")
    from dagster._config import process_config
    from dagster_k8s import k8s_job_executor

    result = process_config(k8s_job_executor.config_schema.config_type, _executor_config(name))
    assert result.success, [e.message for e in result.errors]
    bad = {**_executor_config(name), "per_step_k8s_config": {"trained_models": {"container_confg": {}}}}
    assert not process_config(k8s_job_executor.config_schema.config_type, bad).success


def _step_job(op: str | None, name: str = "executor.yaml"):
    """The Kubernetes Job dagster-k8s would build for a step, with the executor's merged config."""
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import DagsterK8sJobConfig, UserDefinedDagsterK8sConfig, construct_dagster_k8s_job

    config = _executor_config(name)
    context = K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(config["step_k8s_config"]))
    if op is not None:
        override = UserDefinedDagsterK8sConfig.from_dict(config["per_step_k8s_config"][op])
        context = context.merge(K8sContainerContext(run_k8s_config=override))
    return construct_dagster_k8s_job(
        DagsterK8sJobConfig(
            job_image="registry.example.com/reverse-sd:0.1.0", dagster_home="/opt/dagster/dagster_home"
        ),
        ["dagster", "api", "execute_step"],
        f"dagster-step-{op or 'data'}",
        user_defined_k8s_config=context.run_k8s_config,
        component="step_worker",
    )


def test_built_step_jobs_carry_the_gpu_request():
    pytest.importorskip("dagster_k8s", reason="dagster-k8s is not installed: pip install -e '.[deploy]'")
    training = _step_job("trained_models").spec.template.spec
    container = training.containers[0]
    assert container.resources.requests[GPU] == "1" and container.resources.limits[GPU] == "1"
    assert container.resources.requests["memory"] == "48Gi"  # the per-step value wins over the default
    assert any(t.key == GPU for t in training.tolerations)
    data = _step_job(None).spec.template.spec.containers[0]
    assert GPU not in (data.resources.requests or {}) and data.resources.requests["cpu"] == "2"
    multi = _step_job("trained_models", "executor-multi-gpu.yaml").spec.template.spec
    container = multi.containers[0]
    assert container.resources.limits[GPU] == "4"
    assert {"name": "REVERSE_SD_NPROC_PER_NODE", "value": "gpus"} in [
        {"name": e.name, "value": e.value} for e in container.env
    ]
    assert any(m.mount_path == "/dev/shm" for m in container.volume_mounts)
    assert any(v.name == "dshm" and v.empty_dir.medium == "Memory" for v in multi.volumes)


def test_k8s_code_location_loads_with_the_k8s_executor():
    pytest.importorskip("dagster_k8s", reason="dagster-k8s is not installed: pip install -e '.[deploy]'")
    import dagster as dg

    defs = runpy.run_path(str(DEPLOY / "k8s" / "definitions.py"))["defs"]
    dg.Definitions.validate_loadable(defs)
    job = defs.resolve_implicit_global_asset_job_def()
    assert job.executor_def.name == "k8s_reverse_sd"
    from assets.definitions import defs as project_defs

    assert set(defs.resolve_asset_graph().get_all_asset_keys()) == set(
        project_defs.resolve_asset_graph().get_all_asset_keys()
    )


# ---- Helm values ---------------------------------------------------------------------------------


def test_helm_values_point_at_real_files_and_settings():
    values = _load(DEPLOY / "k8s" / "values.yaml")
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    args = deployment["dagsterApiGrpcArgs"]
    code_file = args[args.index("--python-file") + 1]
    assert (PROJECT / code_file).is_file(), code_file
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    pg = values["postgresql"]
    assert pg["enabled"] is False and "postgresqlPassword" not in pg
    assert values["generatePostgresqlPasswordSecret"] is False
    assert (
        pg["postgresqlScheme"]
        == _load(DEPLOY / "postgres" / "dagster.yaml")["storage"]["postgres"]["postgres_db"]["scheme"]
    )
    pools = values["concurrency"]["pools"]
    local_pools = _load(PROJECT / "dagster.yaml")["concurrency"]["pools"]
    assert pools["defaultLimit"] == local_pools["default_limit"] and pools["granularity"] == local_pools["granularity"]
    # the secrets/config maps the executor mounts are the ones the chart's pods get too
    executor = _executor_config()
    assert {s["name"] for s in deployment["envSecrets"]} == set(executor["env_secrets"])
    assert {c["name"] for c in deployment["envConfigMaps"]} == set(executor["env_config_maps"])


def test_torchrun_note_names_a_real_entry_point():
    readme = (DEPLOY / "README.md").read_text()
    assert "torchrun --nproc_per_node" in readme and "-m pipeline.training.ddp" in readme
    assert importlib.util.find_spec("pipeline.training.ddp") is not None


@pytest.mark.parametrize("name", EXECUTORS)
def test_every_step_shares_the_image_cache_volume(name):
    """Step pods find each split's memory-mapped image file on one shared volume (XDG_CACHE_HOME), the data
    steps, the one-GPU steps and the multi-GPU step alike, next to the step's own mounts."""
    pytest.importorskip("dagster_k8s", reason="dagster-k8s is not installed: pip install -e '.[deploy]'")
    for op in [None, *_executor_config(name)["per_step_k8s_config"]]:
        spec = _step_job(op, name).spec.template.spec
        container = spec.containers[0]
        env = {e.name: e.value for e in container.env or []}
        mounts = {m.name: m.mount_path for m in container.volume_mounts or []}
        assert mounts.get("image-cache") == env.get("XDG_CACHE_HOME") == "/cache", (op, mounts, env)
        claims = {v.name: v.persistent_volume_claim.claim_name for v in spec.volumes or [] if v.persistent_volume_claim}
        assert claims == {"image-cache": "reverse-sd-cache"}, op
    multi = _step_job("trained_models", "executor-multi-gpu.yaml").spec.template.spec
    assert {"dshm", "image-cache"} <= {v.name for v in multi.volumes}
