"""Data stages: DiffusionDB parts, the prompt filter, SBERT target embeddings and the vocabulary."""
