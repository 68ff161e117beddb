"""Multi-process training entry point: ``torchrun --nproc_per_node N -m pipeline.training.ddp --spec spec.json``.

An asset (or a person) writes a JSON spec naming everything the run needs as files, so the launched
processes build identical models and datasets on their own:

    {
      "model": {"factory": "pipeline.models:create_model",     # optional, this is the default
                "kwargs": {"name": "vit", "variant": "tiny", "vocab_size": 300}},
      "train": "train.parquet",           # columns: image (bytes) or image_row (into the mapped image file
                                          # named in its metadata), embedding (list[float]), label_indices
      "val": "val.parquet",               # optional
      "columns": {"image": "image", "target": "embedding", "labels": "label_indices"},   # optional
      "stages": "stages.npz",             # optional: arrays stage_0, stage_1, ... (curriculum)
      "loss": {"factory": "module:function"},   # optional: called with lambda_vocab; default ReverseSDLoss
      "config": {... TrainConfig fields ...},
      "checkpoint_dir": "checkpoints/vit/mlc_cl",
      "metrics": "metrics.json",          # rank 0 writes TrainResult.to_dict() here
      "resume": true
    }

Every rank seeds with config.seed before building the model, so the replicas start equal (DDP also
broadcasts rank 0's weights).  Only rank 0 writes checkpoints and the metrics file.  Also runs as a single
process (no torchrun), which is how the asset falls back when there is one device.

Several machines (torchrun ``--nnodes N`` with the c10d rendezvous): the node that holds the spec runs
``torchrun_command(spec, nproc, nnodes=N, rdzv_endpoint="host:port", rdzv_id=ID)`` and hosts the
rendezvous store at ``host:port``; every other node runs ``join_command(...)``, the same torchrun flags
with ``--join`` in place of ``--spec``.  Once the rendezvous completes, the processes launched with
``--spec`` publish the spec's text in torchrun's store and the joining processes read it from there, so
the other nodes need no per-run argument.  The spec's files must then be readable from every node:
``write_spec(..., shared=True)`` writes them through pipeline.storage under a shared root (an object store
or a shared filesystem), with the images inline (a local memory-mapped image file is not visible
elsewhere), and the reads here go through pipeline.storage too.  Whichever node rank 0 lands on writes the
checkpoints and the metrics file, so both must be on the shared root as well.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import socket
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch.distributed as dist

from pipeline import storage
from pipeline.constants import EMBED_DIM
from pipeline.data.image_store import ImageColumn
from pipeline.storage import write_text
from pipeline.training.data import data_path
from pipeline.training.loop import TrainConfig, seed_everything, train_model

DEFAULT_COLUMNS = {"image": "image", "target": "embedding", "labels": "label_indices"}
IMAGE_ROW = "image_row"
IMAGE_FILE_KEY = b"reverse_sd.image_file"


def load_factory(spec: str):
    """ "package.module:function" -> the function."""
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"model factory must look like 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module), name)


def _column_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(array)
    if n == 0:
        return np.zeros((0, EMBED_DIM), dtype=np.float32)
    flat = array.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return flat.reshape(n, -1)


def read_pairs(path: str, columns: dict | None = None) -> tuple[object, np.ndarray, list | None]:
    """(images, targets (n, d) float32, label index lists or None) from a pairs Parquet file.

    Images are either an image-bytes column, or (as write_pairs writes them for a memory-mapped split)
    an "image_row" column into the Arrow image file named in the file's metadata: then every launched
    process maps that one file instead of reading a copy of the images.
    """
    cols = {**DEFAULT_COLUMNS, **(columns or {})}
    with storage.verified_local_copy(path) as local:  # a URL on a shared root: downloaded and checked once
        schema = pq.read_schema(local)
        image_file = (schema.metadata or {}).get(IMAGE_FILE_KEY)
        image_col = IMAGE_ROW if image_file else cols["image"]
        wanted = [image_col, cols["target"]] + ([cols["labels"]] if cols["labels"] in schema.names else [])
        table = pq.read_table(local, columns=wanted)
    if image_file:
        images = ImageColumn(image_file.decode(), table.column(IMAGE_ROW).to_numpy())
    else:
        images = table.column(cols["image"]).combine_chunks()
    targets = _column_matrix(table.column(cols["target"]))
    labels = None
    if cols["labels"] in table.column_names:
        labels = [np.asarray(x or [], dtype=np.int64) for x in table.column(cols["labels"]).to_pylist()]
    return images, targets, labels


def read_stages(path: str | None) -> list[np.ndarray] | None:
    if not path:
        return None
    with storage.verified_local_copy(path) as local, np.load(local) as data:
        keys = sorted((k for k in data.files if k.startswith("stage_")), key=lambda k: int(k.split("_")[1]))
        return [data[k].astype(np.int64) for k in keys]


def write_pairs(path: str, images, targets: np.ndarray, labels, inline_images: bool = False) -> None:
    """The Parquet file read_pairs reads: 384-d target and label index list per pair, plus the images: a
    row index into the image file when ``images`` is a memory-mapped ImageColumn (no copy of the split,
    whatever its size), else (or with ``inline_images``) the image bytes themselves.  Written through
    pipeline.storage: atomic, with its SHA-256 sidecar, to a local path or an fsspec URL."""
    columns = {
        "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(np.ascontiguousarray(targets, dtype=np.float32).ravel()), int(targets.shape[1])
        ),
    }
    metadata = None
    if isinstance(images, ImageColumn) and not inline_images:
        rows = images.rows if images.rows is not None else np.arange(len(images), dtype=np.int64)
        columns[IMAGE_ROW] = pa.array(rows, pa.int64())
        metadata = {IMAGE_FILE_KEY: images.path}
    else:
        columns["image"] = pa.array(list(images), type=pa.binary())
    if labels is not None:
        columns["label_indices"] = pa.array(
            [np.asarray(x, dtype=np.int64).tolist() for x in labels], pa.list_(pa.int64())
        )
    storage.write_parquet(pa.table(columns).replace_schema_metadata(metadata), path)


def write_spec(
    directory: str | Path,
    *,
    model_kwargs: dict,
    train: tuple,
    val: tuple | None,
    config: TrainConfig,
    checkpoint_dir: str,
    stages: list[np.ndarray] | None = None,
    cache_dir: str | None = None,
    shared: bool = False,
    pixel_cache_bytes: int | None = None,
) -> str:
    """Write everything a launched run needs into ``directory`` (train/val Parquet, stages, spec.json).

    ``cache_dir``: where the frozen-prefix feature cache lives (pipeline.training.feature_cache), shared by
    the ranks (each computes its share of the rows) and by later single-process runs.  It must be one
    directory every rank sees: leave it None for several nodes.  ``pixel_cache_bytes``: the budget of the
    decoded-pixel cache used there for a model without a frozen prefix (pipeline.training.pixel_cache; None: its
    default).

    ``shared``: the run spans several nodes, so ``directory`` is on the shared storage root (a local path
    or an fsspec URL such as s3://...) and the images are written into the Parquet files instead of being
    referenced in this machine's memory-mapped image file.

    ``train`` / ``val`` are (images, targets, labels) triples.  Returns the spec path to pass as --spec;
    the run's TrainResult lands in ``directory``/metrics.json.
    """
    directory = str(directory).rstrip("/")
    if not shared or "://" not in directory:
        Path(directory.removeprefix("file://")).mkdir(parents=True, exist_ok=True)

    def at(name: str) -> str:
        return f"{directory}/{name}"

    write_pairs(at("train.parquet"), *train, inline_images=shared)
    if val is not None:
        write_pairs(at("val.parquet"), *val, inline_images=shared)
    if stages is not None:
        buffer = io.BytesIO()
        np.savez(buffer, **{f"stage_{i}": np.asarray(s, np.int64) for i, s in enumerate(stages)})
        storage.write_bytes(buffer.getvalue(), at("stages.npz"))
    spec = {
        "model": {"factory": "pipeline.models:create_model", "kwargs": model_kwargs},
        "train": at("train.parquet"),
        "val": at("val.parquet") if val is not None else None,
        "stages": at("stages.npz") if stages is not None else None,
        "config": config.to_dict(),
        "checkpoint_dir": str(checkpoint_dir),
        "metrics": at("metrics.json"),
        "resume": True,
        "cache_dir": cache_dir,
        "pixel_cache_bytes": pixel_cache_bytes,
    }
    path = at("spec.json")
    write_text(json.dumps(spec, indent=2), path)
    return path


def _rendezvous_flags(nnodes: int, rdzv_endpoint: str, rdzv_id: str, join_timeout_s: int, host: bool) -> list[str]:
    """torchrun's c10d rendezvous; the spec's node hosts its store (is_host), the others only connect to it."""
    return [
        "--nnodes",
        str(int(nnodes)),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        rdzv_endpoint,
        "--rdzv-id",
        rdzv_id,
        "--rdzv-conf",
        f"join_timeout={int(join_timeout_s)},is_host={str(host).lower()}",
    ]


def torchrun_command(
    spec_path: str | Path,
    nproc_per_node: int,
    *,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    rdzv_id: str = "reverse-sd",
    join_timeout_s: int = 600,
) -> list[str]:
    """The launch command: torchrun (as ``python -m torch.distributed.run``), N processes on this node.

    One node: ``--standalone``.  Several: the c10d rendezvous at ``rdzv_endpoint`` (host:port of this node,
    which hosts its store), waiting up to ``join_timeout_s`` for the other nodes' ``join_command``."""
    if nnodes > 1:
        if not rdzv_endpoint:
            raise ValueError("several nodes need a rendezvous endpoint (host:port)")
        launch = _rendezvous_flags(nnodes, rdzv_endpoint, rdzv_id, join_timeout_s, host=True)
    else:
        launch = ["--standalone"]
    return _torchrun(sys.executable, launch, nproc_per_node, "--spec", str(spec_path))


def join_command(
    nproc_per_node: int,
    *,
    nnodes: int,
    rdzv_endpoint: str,
    rdzv_id: str = "reverse-sd",
    join_timeout_s: int = 600,
    python: str = "python",
) -> list[str]:
    """What every other node runs to join a multi-node run: the same rendezvous, ``--join`` for the spec.

    It connects to the rendezvous store the spec's node hosts; started before that node's agent, it fails
    once its connection attempt times out (about a minute), so a standing node runs it in a retry loop."""
    launch = _rendezvous_flags(nnodes, rdzv_endpoint, rdzv_id, join_timeout_s, host=False)
    return _torchrun(python, launch, nproc_per_node, "--join")


def _torchrun(python: str, launch: list[str], nproc_per_node: int, *ddp_args: str) -> list[str]:
    """``python -m torch.distributed.run`` with the ``launch`` flags, N processes each running this module with
    ``ddp_args``."""
    return [
        python,
        "-m",
        "torch.distributed.run",
        *launch,
        "--nproc_per_node",
        str(int(nproc_per_node)),
        "-m",
        "pipeline.training.ddp",
        *ddp_args,
    ]


SPEC_KEY = "reverse_sd/ddp_spec"


def exchange_spec(spec_text: str | None, timeout_s: float = 300.0) -> str:
    """Under torchrun, the spec's text for every process: those launched with ``--spec`` publish it in the
    store torchrun's agent hosts at MASTER_ADDR:MASTER_PORT, those launched with ``--join`` wait for it."""
    if spec_text is not None and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return spec_text
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        if spec_text is not None:
            return spec_text
        raise RuntimeError("--join needs torchrun's c10d rendezvous (--rdzv-backend c10d), which hosts the store")
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=timeout_s),
    )
    if spec_text is not None:
        store.set(SPEC_KEY, spec_text)
        return spec_text
    store.wait([SPEC_KEY])  # raises after timeout_s when no process of the run holds a spec
    return store.get(SPEC_KEY).decode()


def run(spec: dict) -> dict:
    """Build the model and its data path (pipeline.training.data) from ``spec`` and train; returns
    TrainResult.to_dict()."""
    config = TrainConfig(**spec.get("config", {}))
    model_spec = spec.get("model", {})
    factory = load_factory(model_spec.get("factory", "pipeline.models:create_model"))
    seed_everything(config.seed)
    model = factory(**model_spec.get("kwargs", {}))

    def pairs(path):
        return read_pairs(path, spec.get("columns")) if path else None

    data = data_path(
        {"train": pairs(spec["train"]), "val": pairs(spec.get("val"))},
        model,
        spec.get("cache_dir"),
        num_workers=config.num_workers,
        pixel_cache_bytes=spec.get("pixel_cache_bytes"),
    )

    def on_log(record: dict) -> None:
        print(json.dumps(record, default=float), flush=True)

    loss_fn = None
    if spec.get("loss"):
        loss_fn = load_factory(spec["loss"]["factory"])(config.lambda_vocab, **spec["loss"].get("kwargs", {}))
    result = train_model(
        model,
        data,
        config=config,
        checkpoint_dir=spec["checkpoint_dir"],
        stages=read_stages(spec.get("stages")),
        on_log=on_log,
        resume=spec.get("resume", True),
        loss_fn=loss_fn,
    )
    out = result.to_dict()
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and spec.get("metrics"):
        write_text(json.dumps(out, indent=2, default=float), spec["metrics"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--spec", help="JSON spec file or URL (see module docstring)")
    source.add_argument(
        "--join", action="store_true", help="another node of a multi-node run: take the spec from the rendezvous"
    )
    args = parser.parse_args(argv)
    spec_text = None
    if args.spec:
        with storage.verified_local_copy(args.spec) as local:
            spec_text = Path(local).read_text()
    spec = json.loads(exchange_spec(spec_text))
    if args.join:
        missing = [spec[k] for k in ("train", "val", "stages") if spec.get(k) and not storage.exists(spec[k])]
        if missing:
            raise SystemExit(
                f"{missing[0]} is not readable on this node ({socket.gethostname()}): a multi-node run needs the "
                "storage root (REVERSE_SD_HOME) shared by every node"
            )
    try:
        out = run(spec)
        if dist.is_initialized():  # each rank's own line: the test (and a person) can see who took part
            record = {
                "event": "rank_done",
                "rank": dist.get_rank(),
                "world_size": dist.get_world_size(),
                "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
                "host": socket.gethostname(),
                "spec": "joined" if args.join else "given",
                "final_val_cosine": out.get("final_val_cosine"),
            }
            print(json.dumps(record, default=float), flush=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
