"""REVERSE_SD_HOME=s3://bucket/prefix on a real S3 server: moto's (moto[server], a test dependency), started on
127.0.0.1 on a free port and reached through AWS_ENDPOINT_URL_S3 with dummy credentials, as any S3-compatible
server (MinIO, Ceph, ...) would be.

Unit level: pipeline.storage and StorageResource write Parquet and its SHA-256 sidecar as objects, read them
back verified, refuse a damaged object, leave nothing visible of a failed write or a failed multipart upload,
never create a missing bucket, and see objects that another process wrote.  check_storage_root answers a
missing bucket or an unreachable endpoint in one line before anything runs.

End to end (extended): `reverse-sd materialize` of the data stages and the prompt bank into the bucket, nothing
on local disk, then `reverse-sd predict --zero-shot` reads the bank from the bucket.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path

import boto3
import polars as pl
import pytest
import s3fs
from conftest import PROJECT
from environments import sample_env
from moto.server import ThreadedMotoServer

from pipeline import storage
from resources import StorageResource
from resources.core import ArtifactError
from resources.settings import SettingsError, check_storage_root, load_settings

FRAME = pl.DataFrame({"image_id": ["a", "b", "c"], "value": [1.0, 2.0, 3.0]})
DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "reverse-sd-test",
    "AWS_SECRET_ACCESS_KEY": "reverse-sd-test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server (a real HTTP server, in a thread of this process) on 127.0.0.1."""
    port = _free_port()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch) -> dict[str, str]:
    """The AWS variables that point s3fs (and boto3) at the local server, set in this process too."""
    env = {"AWS_ENDPOINT_URL_S3": s3_endpoint, **DUMMY_CREDENTIALS}
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()  # a client made for another endpoint must not be reused
    yield env
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def client(s3_env):
    return boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL_S3"])


@pytest.fixture
def bucket(client) -> str:
    name = f"reverse-sd-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=name)
    return name


def _keys(client, bucket: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _get(client, bucket: str, key: str) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def _cli(args: list[str], env: dict[str, str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=cwd,
        env={**env, "PYTHONPATH": str(PROJECT)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---- unit level ---------------------------------------------------------------------------------------------


def test_parquet_and_sidecar_are_objects_and_read_back_verified(client, bucket):
    root = f"s3://{bucket}/home"
    res = StorageResource(root=root)
    assert not res.has_table("filtered_pairs")
    with pytest.raises(FileNotFoundError, match="materialize asset 'filtered_pairs'"):
        res.read_table("filtered_pairs")
    assert res.write_table(FRAME, "filtered_pairs") == f"{root}/filtered_pairs.parquet"
    res.write_table(FRAME.head(1), "model_predictions", "vit|mlc")
    storage.write_text('{"method": "median"}', f"{root}/models/ensemble.json")

    assert _keys(client, bucket) == [
        "home/filtered_pairs.parquet",
        "home/filtered_pairs.parquet.sha256",
        "home/model_predictions/vit|mlc.parquet",
        "home/model_predictions/vit|mlc.parquet.sha256",
        "home/models/ensemble.json",
        "home/models/ensemble.json.sha256",
    ]  # no temporary object, no "directory" marker
    data = _get(client, bucket, "home/filtered_pairs.parquet")
    record = json.loads(_get(client, bucket, "home/filtered_pairs.parquet.sha256"))
    head = client.head_object(Bucket=bucket, Key="home/filtered_pairs.parquet")
    assert record == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "etag": head["ETag"]}

    assert res.has_table("filtered_pairs") and res.has_table("model_predictions", "vit|mlc")
    assert res.read_table("filtered_pairs").equals(FRAME)
    assert res.read_table("filtered_pairs", columns=["value"]).columns == ["value"]
    assert res.read_table("model_predictions", "vit|mlc").height == 1
    assert storage.verify(f"{root}/filtered_pairs.parquet") == record["sha256"]
    assert storage.as_path(f"{root}/models/ensemble.json").read_text() == '{"method": "median"}'

    before = res.fingerprint("filtered_pairs")
    res.write_table(FRAME.head(2), "filtered_pairs")
    assert res.fingerprint("filtered_pairs") != before  # the ETag moved: caches keyed on it see the rewrite
    assert res.read_table("filtered_pairs").height == 2


def test_a_damaged_object_is_refused_by_readers_and_planning(client, bucket, monkeypatch):
    root = f"s3://{bucket}/home"
    res = StorageResource(root=root)
    target = res.write_table(FRAME, "prompt_bank")
    key = "home/prompt_bank.parquet"
    good = _get(client, bucket, key)

    # intact: planning's cheap check is a HEAD (size and ETag), no download to hash
    real_sha = storage.file_sha256
    monkeypatch.setattr(storage, "file_sha256", lambda *a, **k: pytest.fail("hashed an intact object"))
    assert storage.is_intact(target)
    monkeypatch.setattr(storage, "file_sha256", real_sha)

    client.put_object(Bucket=bucket, Key=key, Body=good[: len(good) // 2])  # truncated by another writer
    with pytest.raises(storage.IntegrityError, match=r"prompt_bank\.parquet is damaged \(truncated"):
        storage.read_parquet(target)
    with pytest.raises(ArtifactError, match="re-materialize asset 'prompt_bank'"):
        res.read_table("prompt_bank")
    assert not storage.is_intact(target)

    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(flipped))  # same size, other bytes
    with pytest.raises(storage.IntegrityError, match=r"damaged \(altered"):
        storage.read_parquet(target)
    assert not storage.is_intact(target)

    client.put_object(Bucket=bucket, Key=key, Body=good)  # the same bytes again: intact (the hash decides)
    assert storage.is_intact(target) and res.read_table("prompt_bank").equals(FRAME)


def test_a_failed_write_leaves_the_previous_object_and_nothing_else(client, bucket):
    target = f"s3://{bucket}/home/filtered_pairs.parquet"
    storage.write_parquet(FRAME, target)
    before = _keys(client, bucket)
    local = None
    with pytest.raises(RuntimeError, match="killed mid-write"):
        with storage.atomic_local_path(target, suffix=".parquet") as tmp:
            local = tmp
            tmp.write_bytes(b"PAR1 half a parquet file")
            raise RuntimeError("killed mid-write")
    assert _keys(client, bucket) == before  # no partial object, no temporary object
    assert storage.read_parquet(target).equals(FRAME)
    assert local is not None and not local.exists()  # the local temporary is gone too


def test_a_multipart_upload_is_visible_only_once_complete(client, bucket, monkeypatch):
    """A checkpoint-sized file goes up in parts (here forced at 5 MiB, S3's minimum): while parts are in flight,
    and after a part fails, no object is visible at the target, the previous version stays, and the failed
    upload is aborted (no parts left behind)."""
    monkeypatch.setattr(s3fs.core, "calculate_chunksize", lambda *a, **k: 5 * 2**20)
    target = f"s3://{bucket}/home/trained_models/vit/ckpt-00001.safetensors"
    key = "home/trained_models/vit/ckpt-00001.safetensors"
    payload = os.urandom(11 * 2**20)  # three parts

    seen_during_upload: list[list[str]] = []
    failing = {"on": False}
    real_call = s3fs.S3FileSystem._call_s3

    async def call_s3(self, method, *args, **kwargs):
        if method == "upload_part":
            seen_during_upload.append(_keys(client, bucket))
            if failing["on"] and kwargs.get("PartNumber") == 2:
                raise OSError("connection reset during part 2")
        return await real_call(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", call_s3)

    storage.write_bytes(payload, target)
    assert seen_during_upload and all(key not in keys for keys in seen_during_upload)
    assert _get(client, bucket, key) == payload
    record = storage.recorded_hash(target)
    assert record["etag"].endswith('-3"')  # a multipart ETag: the cheap check still works on it
    assert storage.is_intact(target) and storage.verify(target) == hashlib.sha256(payload).hexdigest()

    failing["on"] = True
    with pytest.raises(OSError, match="part 2"):
        storage.write_bytes(os.urandom(11 * 2**20), target)
    assert _get(client, bucket, key) == payload  # the previous version, whole
    assert storage.verify(target) == hashlib.sha256(payload).hexdigest()
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_a_missing_bucket_is_an_error_never_created(client, bucket, s3_env):
    missing = f"reverse-sd-missing-{uuid.uuid4().hex[:8]}"
    before = {b["Name"] for b in client.list_buckets()["Buckets"]}
    with pytest.raises(FileNotFoundError):
        storage.write_parquet(FRAME, f"s3://{missing}/home/filtered_pairs.parquet")
    assert {b["Name"] for b in client.list_buckets()["Buckets"]} == before  # (s3fs's mkdir would create it)

    for create in (True, False):
        with pytest.raises(SettingsError) as refused:
            check_storage_root(load_settings({"REVERSE_SD_HOME": f"s3://{missing}/home"}), create=create)
        message = str(refused.value)
        assert message.startswith(f"REVERSE_SD_HOME='s3://{missing}/home' cannot be ")
        assert f"bucket {missing!r} does not exist" in message and s3_env["AWS_ENDPOINT_URL_S3"] in message
        assert "\n" not in message
    assert {b["Name"] for b in client.list_buckets()["Buckets"]} == before

    check_storage_root(load_settings({"REVERSE_SD_HOME": f"s3://{bucket}/home"}))  # writable: the probe passes
    assert _keys(client, bucket) == []  # and is removed


def test_an_unreachable_endpoint_is_one_line_before_anything_runs(monkeypatch, s3_env):
    closed = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", closed)
    s3fs.S3FileSystem.clear_instance_cache()
    start = time.monotonic()
    with pytest.raises(SettingsError) as refused:
        check_storage_root(load_settings({"REVERSE_SD_HOME": "s3://any-bucket/home"}))
    assert time.monotonic() - start < 60
    message = str(refused.value)
    assert "cannot be written" in message and f"endpoint {closed}" in message and "\n" not in message


def test_objects_another_process_wrote_are_seen_after_a_listing(client, bucket):
    """A long-lived process (the CLI, a code server) lists a prefix, another process writes there: exists()
    and iterdir() see the new object (s3fs's listing cache is off for the storage root)."""
    root = f"s3://{bucket}/home/trained_models/vit"
    storage.write_bytes(b"one", f"{root}/ckpt-00001.safetensors")
    assert [p.name for p in storage.as_path(root).iterdir()] == [
        "ckpt-00001.safetensors",
        "ckpt-00001.safetensors.sha256",
    ]
    assert not storage.exists(f"{root}/ckpt-00002.safetensors")
    client.put_object(Bucket=bucket, Key="home/trained_models/vit/ckpt-00002.safetensors", Body=b"two")
    assert storage.exists(f"{root}/ckpt-00002.safetensors")
    assert "ckpt-00002.safetensors" in [p.name for p in storage.as_path(root).iterdir()]


def test_predict_reads_the_bank_and_a_trained_model_from_the_bucket(client, bucket, s3_env, tmp_path):
    """`reverse-sd predict --model vit` (a fresh process) with REVERSE_SD_HOME=s3://...: the checkpoint, its
    sidecar, the prompt bank and the vocabulary are objects, written through pipeline.storage / the checkpoint
    code, and read back from the bucket (nothing local to fall back on)."""
    import numpy as np
    from PIL import Image

    from pipeline.models import create_model
    from pipeline.training.checkpoint import latest_checkpoint, save_checkpoint

    root = f"s3://{bucket}/home"
    words = ["red", "blue", "circle", "square", "painting", "photo"]
    save_checkpoint(f"{root}/trained_models/vit/mlc", create_model("vit", variant="tiny", vocab_size=len(words)))
    assert latest_checkpoint(f"{root}/trained_models/vit/mlc") is not None
    bank = np.random.default_rng(1).normal(size=(6, 384)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    prompts = [f"prompt {i}" for i in range(6)]
    storage.write_parquet(pl.DataFrame({"prompt": prompts, "embedding": bank}), f"{root}/prompt_bank.parquet")
    vocabulary = {"index": np.arange(6, dtype=np.int32), "word": words, "count": np.arange(6, 0, -1)}
    storage.write_parquet(pl.DataFrame(vocabulary), f"{root}/vocabulary.parquet")
    keys = _keys(client, bucket)
    assert any(k.startswith("home/trained_models/vit/mlc/") and k.endswith(".safetensors") for k in keys), keys
    assert all(".tmp" not in k for k in keys), keys

    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    env = sample_env(tmp_path, REVERSE_SD_HOME=root, XDG_CACHE_HOME=str(tmp_path / "cache"), **s3_env)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = _cli(["predict", "--model", "vit", "--top-k", "2", str(image)], env, cwd, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert "vit" in record["model"] and len(record["prompts"]) == 2
    assert all(p["prompt"] in prompts for p in record["prompts"]) and record["words"], record
    assert all(w["word"] in words for w in record["words"]), record
    assert not any(cwd.iterdir())

    # a damaged checkpoint object is refused in one line, naming it
    ckpt = next(k for k in keys if k.endswith(".safetensors"))
    client.put_object(Bucket=bucket, Key=ckpt, Body=_get(client, bucket, ckpt)[:1000])
    refused = _cli(["predict", "--model", "vit", str(image)], env, cwd, timeout=600)
    assert refused.returncode != 0 and "damaged (truncated" in refused.stderr and ckpt in refused.stderr
    assert "Traceback" not in refused.stderr


# ---- end to end: the CLI on the bucket ----------------------------------------------------------------------

ARTIFACTS = [
    "diffusiondb_parts/part-000001.parquet",
    "filtered_pairs.parquet",
    "prompt_embeddings.parquet",
    "prompt_bank.parquet",
]


@pytest.mark.extended
def test_materialize_into_the_bucket_then_predict_reads_the_bank_from_it(client, bucket, s3_env, tmp_path):
    prefix = "reverse-sd/home"
    root = f"s3://{bucket}/{prefix}"
    env = sample_env(
        tmp_path,
        REVERSE_SD_HOME=root,
        REVERSE_SD_SAMPLE_PARTS="1",
        REVERSE_SD_SAMPLE_IMAGES_PER_PART="24",
        XDG_CACHE_HOME=str(tmp_path / "cache"),  # the local caches (sample mirror, hashes) of a remote root
        **s3_env,
    )
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    start = time.monotonic()
    result = _cli(["materialize", "--select", "*prompt_bank"], env, cwd, timeout=900)
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert f"storage={root}" in result.stdout
    print(f"materialize *prompt_bank into {root}: {elapsed:.0f} s")

    keys = _keys(client, bucket)
    for artifact in ARTIFACTS:  # every artifact and its sidecar is an object, and verifies
        assert f"{prefix}/{artifact}" in keys and f"{prefix}/{artifact}.sha256" in keys, keys
        assert storage.verify(f"{root}/{artifact}")
    assert all(k.startswith(f"{prefix}/") and ".tmp" not in k for k in keys), keys
    local = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    artifact_names = {Path(a).name for a in ARTIFACTS} | {Path(a).name + ".sha256" for a in ARTIFACTS}
    assert not local & artifact_names, local & artifact_names  # none on local disk
    assert not any(cwd.iterdir())
    assert not (Path(root.replace("://", ":/"))).exists() and not (cwd / "s3:").exists()

    # predict, in a fresh process, ranks the bank it reads from the bucket
    mirror = next((tmp_path / "cache" / "reverse-sd" / "sample_mirror").glob("1x24-*/images/part-000001.zip"))
    with zipfile.ZipFile(mirror) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".png"))
        image = tmp_path / "image.png"
        image.write_bytes(archive.read(name))
    predicted = _cli(["predict", "--zero-shot", "--top-k", "3", str(image)], env, cwd, timeout=600)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    record = json.loads(predicted.stdout.strip().splitlines()[-1])
    bank = set(storage.read_parquet(f"{root}/prompt_bank.parquet")["prompt"].to_list())
    assert len(record["prompts"]) == 3 and all(p["prompt"] in bank for p in record["prompts"]), record


def test_stale_planning_sees_a_missing_or_damaged_object(client, bucket):
    """--stale judges artifacts in a bucket too (they used to be skipped): missing, damaged, intact."""
    import dagster as dg

    from cli.staleness import _Records, stale_reason

    res = StorageResource(root=f"s3://{bucket}/plan")
    target = str(res.write_table(FRAME, "prompt_bank"))

    @dg.asset
    def prompt_bank():
        """Stands in for the real asset: only its records matter here."""

    graph = dg.Definitions(assets=[prompt_bank]).resolve_asset_graph()
    key = dg.AssetKey("prompt_bank")
    with dg.instance_for_test() as instance:
        instance.report_runless_asset_event(
            dg.AssetMaterialization(asset_key=key, metadata={"path": dg.MetadataValue.path(target)})
        )
        assert stale_reason(key, None, [], _Records(instance, graph, root=res.root)) is None
        good = _get(client, bucket, "plan/prompt_bank.parquet")
        client.put_object(Bucket=bucket, Key="plan/prompt_bank.parquet", Body=good[:100])
        assert stale_reason(key, None, [], _Records(instance, graph, root=res.root)) == f"artifact damaged: {target}"
        client.delete_object(Bucket=bucket, Key="plan/prompt_bank.parquet")
        assert stale_reason(key, None, [], _Records(instance, graph, root=res.root)) == f"artifact missing: {target}"
