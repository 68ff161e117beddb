"""Training: the loop, checkpoints, the curriculum, training pairs and multi-process (DDP) launch."""
