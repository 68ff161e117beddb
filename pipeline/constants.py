"""The method's few fixed names and sizes, in one place and free of heavy imports (settings read them)."""

EMBED_DIM = 384  # all-MiniLM-L6-v2, the prompt embedding every model predicts
BACKBONE_NAMES = ("vit", "swin", "clip", "unet")  # the registry's backbones, in the paper's order
RECIPES = ("baseline", "mlc", "mlc_cl")  # cosine loss; + vocabulary head; + curriculum
