"""Runs on Celery workers (deploy/celery/): dagster-celery's CeleryRunLauncher, plus what it lacks for a worker
that dies.

dagster-celery sends each whole run to a Celery worker as one task (``execute_job``); the worker runs it in its
own process (``--pool=solo``), with the in-process executor of this code location.  Its health check asks the
result backend for the task's state, and a worker killed with ``kill -9`` (or by the OOM killer, or a lost
host) leaves that state at STARTED forever: the run would stay STARTED, its pool slots held, and
`reverse-sd materialize` would wait on it.  So:

- a worker that imports this module (``dagster-celery worker start -i resources.celery_launcher``) writes a
  heartbeat to the result backend's Redis every ``HEARTBEAT_SECONDS`` from a thread (a solo worker's event loop
  is blocked while a run executes, so Celery's own heartbeats and pings stop then; a thread's do not), and tags
  each run it executes with its node name (``reverse-sd/celery-worker``, in the UI's run tags);
- ``CeleryRunLauncher`` below (the ``run_launcher`` of deploy/celery/dagster.yaml) reports a STARTED task whose
  worker announced itself but whose heartbeat expired (``HEARTBEAT_TTL_SECONDS``), or now comes from another
  process of the same name (a restarted worker), as FAILED; the daemon's run monitoring then marks the run
  failed and frees its slots, and the next ``materialize --stale`` runs it again.  A worker that never loaded
  this module is judged by Celery's state alone, as dagster-celery does.

Only ``dagster_celery``'s public launcher and Celery's signals are used; no private Dagster module.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from celery import signals
from dagster_celery.launcher import CeleryRunLauncher as _CeleryRunLauncher

WORKER_TAG = "reverse-sd/celery-worker"
TASK_ID_TAG = "dagster-celery/task_id"  # dagster_celery.tags.DAGSTER_CELERY_TASK_ID_TAG
HEARTBEAT_SECONDS = 5
HEARTBEAT_TTL_SECONDS = 30
SEEN_TTL_SECONDS = 7 * 24 * 3600

log = logging.getLogger(__name__)


def _beat_key(node: str) -> str:
    return f"reverse-sd:celery-worker:beat:{node}"


def _seen_key(node: str) -> str:
    return f"reverse-sd:celery-worker:seen:{node}"


def _redis(app):
    """The result backend's Redis client, or None for another backend (no heartbeats then)."""
    backend = app.backend
    client = getattr(backend, "client", None)
    return client if client is not None and hasattr(client, "set") and hasattr(client, "get") else None


class CeleryRunLauncher(_CeleryRunLauncher):
    """dagster-celery's run launcher, whose health check also fails a run whose worker stopped beating."""

    def check_run_worker_health(self, run):
        result = super().check_run_worker_health(run)
        if result.status.value != "RUNNING":
            return result
        task_id = run.tags.get(TASK_ID_TAG)
        client = _redis(self.celery)
        if not task_id or client is None:
            return result
        info = self.celery.AsyncResult(task_id).info
        if not isinstance(info, dict) or not info.get("hostname"):
            return result
        node, pid = info["hostname"], info.get("pid")
        try:
            if not client.exists(_seen_key(node)):
                return result  # a worker without the heartbeat: Celery's state is all there is
            beat = client.get(_beat_key(node))
        except Exception:  # noqa: BLE001 - the broker/backend unreachable: no verdict on the worker
            log.warning("cannot read the heartbeat of Celery worker %s", node, exc_info=True)
            return result
        if beat is None:
            why = f"Celery worker {node} (pid {pid}) stopped sending heartbeats (killed or lost)"
        elif pid is not None and beat.decode() != str(pid):
            why = f"Celery worker {node} was restarted (pid {beat.decode()}, the run's was {pid}): the run's process is gone"
        else:
            return result
        return result._replace(status=type(result.status).FAILED, msg=why)


# ---- in the worker (imported through `-i resources.celery_launcher`) ----------------------------------------


@signals.worker_ready.connect
def _start_heartbeat(sender=None, **_kwargs) -> None:
    app, node, pid = sender.app, sender.hostname, os.getpid()
    client = _redis(app)
    if client is None:
        log.warning("result backend is not Redis: no heartbeat, a killed worker's run stays STARTED")
        return

    def beat() -> None:
        client.set(_seen_key(node), str(pid), ex=SEEN_TTL_SECONDS)
        while True:
            try:
                client.set(_beat_key(node), str(pid), ex=HEARTBEAT_TTL_SECONDS)
            except Exception:  # noqa: BLE001 - Redis briefly away: the TTL tells the launcher if it lasts
                log.warning("heartbeat to the result backend failed", exc_info=True)
            time.sleep(HEARTBEAT_SECONDS)

    threading.Thread(target=beat, name="reverse-sd-heartbeat", daemon=True).start()
    log.info("reverse-sd heartbeat started for %s (pid %s)", node, pid)


@signals.task_prerun.connect
def _tag_run_with_worker(sender=None, task=None, kwargs=None, **_extra) -> None:
    """Name this worker on the run it is about to execute (run tag ``reverse-sd/celery-worker``)."""
    packed = (kwargs or {}).get("execute_job_args_packed")
    # ExecuteRunArgs stores run_id as "pipeline_run_id" (its serialized name, kept for old readers)
    run_id = (packed.get("run_id") or packed.get("pipeline_run_id")) if isinstance(packed, dict) else None
    if not run_id:
        return
    import dagster as dg

    node = getattr(getattr(task, "request", None), "hostname", None) or getattr(sender.request, "hostname", "")
    try:
        with dg.DagsterInstance.get() as instance:
            instance.add_run_tags(run_id, {WORKER_TAG: node})
    except Exception:  # noqa: BLE001 - a tag is for people; the run goes on without it
        log.warning("could not tag run %s with its worker", run_id, exc_info=True)
