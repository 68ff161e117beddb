"""The tiny random-init CLIPModel that stands in for a hub CLIP offline (CLIP scores, zero-shot retrieval).

One shape and one builder, so the caption scorer and the zero-shot twin are the same model for a seed.
"""

from __future__ import annotations

# Small enough to build, save and run in about a second on a CPU.
TINY_CLIP = dict(
    text=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77
    ),
    vision=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    ),
    projection_dim=32,
)


def tiny_clip_model(tokenizer, seed: int = 0):
    """A seeded tiny CLIPModel whose text tower reads ``tokenizer``'s ids (the global torch RNG is restored)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    text = dict(
        TINY_CLIP["text"],
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return CLIPModel(
            CLIPConfig(text_config=text, vision_config=TINY_CLIP["vision"], projection_dim=TINY_CLIP["projection_dim"])
        )
    finally:
        torch.random.set_rng_state(state)
