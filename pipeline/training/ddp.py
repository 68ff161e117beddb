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
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch.distributed as dist

from pipeline.constants import EMBED_DIM
from pipeline.data.image_store import ImageColumn
from pipeline.storage import write_text
from pipeline.training.datasets import PairDataset
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
    schema = pq.read_schema(path)
    image_file = (schema.metadata or {}).get(IMAGE_FILE_KEY)
    image_col = IMAGE_ROW if image_file else cols["image"]
    wanted = [image_col, cols["target"]] + ([cols["labels"]] if cols["labels"] in schema.names else [])
    table = pq.read_table(path, columns=wanted)
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
    with np.load(path) as data:
        keys = sorted((k for k in data.files if k.startswith("stage_")), key=lambda k: int(k.split("_")[1]))
        return [data[k].astype(np.int64) for k in keys]


def write_pairs(path: str, images, targets: np.ndarray, labels) -> None:
    """The Parquet file read_pairs reads: 384-d target and label index list per pair, plus the images: a
    row index into the image file when ``images`` is a memory-mapped ImageColumn (no copy of the split,
    whatever its size), else the image bytes themselves."""
    columns = {
        "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(np.ascontiguousarray(targets, dtype=np.float32).ravel()), int(targets.shape[1])
        ),
    }
    metadata = None
    if isinstance(images, ImageColumn):
        rows = images.rows if images.rows is not None else np.arange(len(images), dtype=np.int64)
        columns[IMAGE_ROW] = pa.array(rows, pa.int64())
        metadata = {IMAGE_FILE_KEY: images.path}
    else:
        columns["image"] = pa.array(list(images), type=pa.binary())
    if labels is not None:
        columns["label_indices"] = pa.array(
            [np.asarray(x, dtype=np.int64).tolist() for x in labels], pa.list_(pa.int64())
        )
    pq.write_table(pa.table(columns).replace_schema_metadata(metadata), path)


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
) -> Path:
    """Write everything a launched run needs into ``directory`` (train/val Parquet, stages, spec.json).

    ``cache_dir``: where the frozen-prefix feature cache lives (pipeline.training.feature_cache), shared by
    the ranks (each computes its share of the rows) and by later single-process runs.

    ``train`` / ``val`` are (images, targets, labels) triples.  Returns the spec path to pass as --spec;
    the run's TrainResult lands in ``directory``/metrics.json.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_pairs(str(directory / "train.parquet"), *train)
    if val is not None:
        write_pairs(str(directory / "val.parquet"), *val)
    if stages is not None:
        np.savez(directory / "stages.npz", **{f"stage_{i}": np.asarray(s, np.int64) for i, s in enumerate(stages)})
    spec = {
        "model": {"factory": "pipeline.models:create_model", "kwargs": model_kwargs},
        "train": str(directory / "train.parquet"),
        "val": str(directory / "val.parquet") if val is not None else None,
        "stages": str(directory / "stages.npz") if stages is not None else None,
        "config": config.to_dict(),
        "checkpoint_dir": str(checkpoint_dir),
        "metrics": str(directory / "metrics.json"),
        "resume": True,
        "cache_dir": cache_dir,
    }
    path = directory / "spec.json"
    path.write_text(json.dumps(spec, indent=2))
    return path


def torchrun_command(spec_path: str | Path, nproc_per_node: int) -> list[str]:
    """The launch command: torchrun (as ``python -m torch.distributed.run``) on this node, N processes."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(int(nproc_per_node)),
        "-m",
        "pipeline.training.ddp",
        "--spec",
        str(spec_path),
    ]


def run(spec: dict) -> dict:
    """Build model and datasets from ``spec`` and train; returns TrainResult.to_dict()."""
    config = TrainConfig(**spec.get("config", {}))
    model_spec = spec.get("model", {})
    factory = load_factory(model_spec.get("factory", "pipeline.models:create_model"))
    seed_everything(config.seed)
    model = factory(**model_spec.get("kwargs", {}))

    def dataset(path):
        if not path:
            return None
        images, targets, labels = read_pairs(path, spec.get("columns"))
        return PairDataset.for_model(images, targets, labels, model)

    train_set, val_set = dataset(spec["train"]), dataset(spec.get("val"))

    def on_log(record: dict) -> None:
        print(json.dumps(record, default=float), flush=True)

    loss_fn = None
    if spec.get("loss"):
        loss_fn = load_factory(spec["loss"]["factory"])(config.lambda_vocab, **spec["loss"].get("kwargs", {}))
    result = train_model(
        model,
        train_set,
        val_set,
        config,
        spec["checkpoint_dir"],
        stages=read_stages(spec.get("stages")),
        on_log=on_log,
        resume=spec.get("resume", True),
        loss_fn=loss_fn,
        cache_dir=spec.get("cache_dir"),
    )
    out = result.to_dict()
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and spec.get("metrics"):
        write_text(json.dumps(out, indent=2, default=float), spec["metrics"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", required=True, help="JSON spec file (see module docstring)")
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    try:
        run(spec)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
