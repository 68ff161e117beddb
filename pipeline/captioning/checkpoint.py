"""A trained captioner on disk: tokenizer files and safetensors weights, rebuilt without the hub."""

from __future__ import annotations

import json
import os
import tempfile

from pipeline.captioning.model import Captioner

TOKENIZER_DIR = "tokenizer"


def save_captioner(captioner: Captioner, directory: str, progress: dict | None = None, config: dict | None = None):
    """Tokenizer files, then weights (pipeline.training.checkpoint: safetensors, atomic); weights present = complete."""
    from pipeline import storage as store
    from pipeline.training.checkpoint import remove_checkpoints, save_checkpoint

    remove_checkpoints(directory)
    old = store.as_path(f"{directory.rstrip('/')}/{TOKENIZER_DIR}")
    if old.exists():  # files another tokenizer version wrote must not be read with this one's
        for entry in old.iterdir():
            entry.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        captioner.tokenizer.save_pretrained(tmp)
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                data = f.read()
            with store.atomic_local_path(f"{directory.rstrip('/')}/{TOKENIZER_DIR}/{name}") as target:
                target.write_bytes(data)
    return save_checkpoint(directory, captioner, progress=progress, config=config, index=1, rng=False, keep_last=1)


def load_captioner(directory: str, device: str = "cpu") -> Captioner:
    """Rebuild a saved captioner from its directory alone (no hub: the BLIP config and tokenizer are stored),
    through the one checkpoint loader (sidecar verified, weights checked against the rebuilt model)."""
    from transformers import AutoTokenizer

    from pipeline import storage as store
    from pipeline.training.checkpoint import CheckpointError, latest_checkpoint, load_model

    weights = latest_checkpoint(directory)
    if weights is None:
        raise CheckpointError(f"no captioner checkpoint in {directory}")
    with tempfile.TemporaryDirectory() as tmp:
        source = store.as_path(f"{directory.rstrip('/')}/{TOKENIZER_DIR}")
        for entry in source.iterdir():
            with open(os.path.join(tmp, entry.name), "wb") as f:
                f.write(entry.read_bytes())
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    return load_model(
        weights,
        device=device,
        expected_embedding_dim=None,
        factory=lambda **config: _build_captioner(tokenizer, config),
    )


def _build_captioner(tokenizer, config: dict) -> Captioner:
    """An untrained captioner of a checkpoint's recorded architecture (BLIP or BLIP-2 config, vocabulary)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, BlipConfig, BlipForConditionalGeneration

    if config.get("family", "blip") == "blip2":
        model = Blip2ForConditionalGeneration(Blip2Config.from_dict(json.loads(config["blip_config"])))
    else:
        model = BlipForConditionalGeneration(BlipConfig.from_dict(json.loads(config["blip_config"])))
    return Captioner(
        model,
        tokenizer,
        name=config["captioner"],
        variant=config["variant"],
        vocab_size=config["vocab_size"],
        max_length=config["max_length"],
        generation=config.get("generation"),
    )
