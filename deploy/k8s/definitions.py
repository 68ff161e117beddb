"""The reverse-sd code location for Kubernetes: the project's own Definitions (assets.definitions), with
dagster-k8s's k8s_job_executor so each step runs as a Kubernetes Job, and the step resources (one GPU for
each training asset) from executor.yaml beside this file.  Nothing in assets/ changes for this: the same
graph runs on a laptop with `make ui` and on a cluster with this file as its code location.

Load it with `dagster api grpc --python-file deploy/k8s/definitions.py --working-directory .` (the Helm
chart's dagsterApiGrpcArgs, see values.yaml) or `dagster dev -f deploy/k8s/definitions.py`.
Needs the `deploy` extra: pip install -e '.[deploy]'.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from dagster_k8s import k8s_job_executor

from assets.definitions import build_definitions

EXECUTOR_FILE = Path(__file__).with_name("executor.yaml")
EXECUTOR_CONFIG = yaml.safe_load(EXECUTOR_FILE.read_text())["execution"]["config"]

# The project's graph with its executor (in-process runs) replaced by the step-per-Job executor.
defs = build_definitions(k8s_job_executor.configured(EXECUTOR_CONFIG, name="k8s_reverse_sd"))
