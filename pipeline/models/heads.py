"""The embedding head and the vocabulary (multi-label) head, in the paper's three configurations.

- ``independent``: both heads read the backbone features.
- ``cls_to_emb``: the classifier reads the features; its *sigmoid probabilities* (bounded in [0, 1], on a
  scale comparable to the features, unlike raw logits) are concatenated with the features and fed to the
  embedding head.
- ``emb_to_cls`` (default, best in the paper): the embedding head reads the features; its L2-normalised
  output (the prediction that is scored) is concatenated with the features and fed to the classifier.

With ``vocab_size == 0`` there is no vocabulary head (the baseline recipe) and every mode reduces to the
embedding head alone; logits are None.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

HEAD_MODES = ("independent", "cls_to_emb", "emb_to_cls")


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.Module:
    """Linear layers with GELU between them; no hidden sizes gives a single linear projection."""
    dims = [in_dim, *hidden, out_dim]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        if i:
            layers.append(nn.GELU())
        layers.append(nn.Linear(a, b))
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


class EmbeddingHead(nn.Module):
    """features -> unit-length embedding (the MiniLM target lives on the unit sphere)."""

    def __init__(self, in_dim: int, embed_dim: int, hidden: Sequence[int] = ()):
        super().__init__()
        self.net = mlp(in_dim, hidden, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)


class VocabularyHead(nn.Module):
    """features -> one logit per vocabulary word (multi-label, trained with BCE-with-logits)."""

    def __init__(self, in_dim: int, vocab_size: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def check_head_mode(head_mode: str) -> None:
    if head_mode not in HEAD_MODES:
        raise ValueError(f"unknown head_mode {head_mode!r}; valid head modes: {', '.join(HEAD_MODES)}")


class ReverseSDHeads(nn.Module):
    """Both heads wired in one of HEAD_MODES: features -> (embedding, vocab logits or None)."""

    def __init__(
        self,
        feature_dim: int,
        embed_dim: int,
        vocab_size: int,
        head_mode: str = "emb_to_cls",
        hidden: Sequence[int] = (),
    ):
        super().__init__()
        check_head_mode(head_mode)
        if vocab_size < 0 or embed_dim <= 0:
            raise ValueError(f"need vocab_size >= 0 and embed_dim > 0, got {vocab_size}, {embed_dim}")
        self.head_mode = head_mode
        self.vocab_size = int(vocab_size)
        has_vocab = vocab_size > 0
        emb_in = feature_dim + (vocab_size if has_vocab and head_mode == "cls_to_emb" else 0)
        cls_in = feature_dim + (embed_dim if head_mode == "emb_to_cls" else 0)
        self.embedding = EmbeddingHead(emb_in, embed_dim, hidden)
        self.vocabulary = VocabularyHead(cls_in, vocab_size) if has_vocab else None

    @torch.no_grad()
    def init_from_targets(self, mean_target: torch.Tensor, label_frequency: torch.Tensor | None = None) -> None:
        """Start from the data's prior instead of noise: the embedding head outputs the mean training target
        (its last layer's weights zeroed, bias = the mean) and each word's logit is its training frequency's
        log-odds.  A fresh model then scores the mean-embedding baseline from step one and spends its
        updates on what the image adds, instead of first walking from a random direction to the mean."""
        last = self.embedding.net if isinstance(self.embedding.net, nn.Linear) else self.embedding.net[-1]
        last.weight.zero_()
        last.bias.copy_(torch.as_tensor(mean_target, dtype=last.bias.dtype))
        if self.vocabulary is not None and label_frequency is not None:
            p = torch.as_tensor(label_frequency, dtype=torch.float64).clamp(1e-4, 1 - 1e-4)
            self.vocabulary.linear.bias.copy_(torch.log(p / (1 - p)).to(self.vocabulary.linear.bias.dtype))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.vocabulary is None:
            return self.embedding(features), None
        if self.head_mode == "independent":
            return self.embedding(features), self.vocabulary(features)
        if self.head_mode == "cls_to_emb":
            logits = self.vocabulary(features)
            return self.embedding(torch.cat([features, torch.sigmoid(logits)], dim=-1)), logits
        embedding = self.embedding(features)
        return embedding, self.vocabulary(torch.cat([features, embedding], dim=-1))
