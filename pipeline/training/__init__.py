"""Training: the loop, checkpoints, the curriculum, training pairs and multi-process (DDP) launch."""


def warm_up() -> None:
    """Import what every GPU stage needs (torch, timm through the model registry, the loop, the datasets), so a
    caller can pay that before it waits for a device rather than after it got one."""
    import pipeline.models  # noqa: F401
    import pipeline.training.checkpoint  # noqa: F401
    import pipeline.training.datasets  # noqa: F401
    import pipeline.training.inference  # noqa: F401
    import pipeline.training.loop  # noqa: F401
