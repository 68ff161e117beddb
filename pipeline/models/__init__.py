"""Models of reverse-sd: four backbones (vit, swin, clip, unet), the embedding / vocabulary heads, the loss.

from pipeline.models import create_model
model = create_model("vit", variant="tiny", vocab_size=1000)
embedding, logits = model(pixels)            # [B, 384] unit rows, [B, 1000] (None when vocab_size=0)
"""

from pipeline.models.heads import HEAD_MODES, EmbeddingHead, ReverseSDHeads, VocabularyHead
from pipeline.models.loss import ReverseSDLoss, multi_hot
from pipeline.models.registry import (
    BACKBONES,
    BackboneSpec,
    ReverseSDModel,
    create_model,
)

__all__ = [
    "BACKBONES",
    "HEAD_MODES",
    "BackboneSpec",
    "EmbeddingHead",
    "ReverseSDHeads",
    "ReverseSDLoss",
    "ReverseSDModel",
    "VocabularyHead",
    "create_model",
    "multi_hot",
]
