"""The captioner module: a BLIP or BLIP-2 model, a vocabulary head on its pooled image features, its tokenizer
and preprocessing, behind one forward signature so that loss, datasets and training are the same for both."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipeline.models.backbones import CLIP_MEAN, CLIP_STD  # BLIP's and CLIP's image processors share these


class Captioner(nn.Module):
    """A BLIP or BLIP-2 captioner, the vocabulary head on its pooled image features, its tokenizer and
    preprocessing.

    ``forward(pixels, input_ids, attention_mask)`` -> (token logits [B, T, V] over the text positions only,
    vocab logits [B, K] or None).  Text goes in as the model was pre-trained: BOS ([DEC] for BLIP), the
    prompt's tokens, EOS.  BLIP-2's image placeholder tokens are added here, in front of the text, and their
    logits dropped, so the loss and the datasets are the same for both families.  ``generation`` holds the
    default decoding settings (num_beams, ...); they are saved with the checkpoint, so `reverse-sd predict
    --generate` decodes as the run that trained it was configured to.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        name: str,
        variant: str,
        vocab_size: int,
        max_length: int,
        generation: dict | None = None,
        freeze_language_model: bool = False,
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name, self.variant = name, variant
        self.vocab_size = int(vocab_size)
        self.max_length = int(max_length)
        self.generation = dict(generation or {"num_beams": 1})
        config = model.config
        self.family = "blip2" if hasattr(model, "qformer") else "blip"
        self.image_size = int(config.vision_config.image_size)
        self.mean, self.std = CLIP_MEAN, CLIP_STD
        if self.family == "blip2":
            self.num_query_tokens = int(config.num_query_tokens)
            self.image_token_id = int(config.image_token_id)
            pooled_width = int(config.qformer_config.hidden_size)
            # BLIP-2's captioning fine-tune keeps its pre-trained LLM frozen; a random-init one (tiny) must learn
            self.freeze_language_model = bool(freeze_language_model)
            model.language_model.requires_grad_(not self.freeze_language_model)
        else:
            pooled_width = int(config.vision_config.hidden_size)
        self.vocab_head = nn.Linear(pooled_width, self.vocab_size) if self.vocab_size else None

    def encode_text(self, prompts: Sequence[str], padding: str = "max_length") -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) [n, max_length]: BOS, the prompt's tokens, EOS, truncated to max_length."""
        text = self.model.config.text_config
        if self.family == "blip":
            enc = self.tokenizer(
                list(prompts), padding=padding, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            ids = enc["input_ids"].clone()
            ids[:, 0] = text.bos_token_id  # [DEC] in place of [CLS]: what BLIP's generate starts from
            return ids, enc["attention_mask"]
        pieces = self.tokenizer(
            list(prompts), add_special_tokens=False, truncation=True, max_length=self.max_length - 2
        )
        rows = [[text.bos_token_id, *p, text.eos_token_id] for p in pieces["input_ids"]]
        width = self.max_length if padding == "max_length" else max(map(len, rows), default=2)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids, mask

    def _with_image_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """BLIP-2 reads the Q-Former's outputs where its input holds num_query_tokens image placeholders."""
        image = input_ids.new_full((input_ids.shape[0], self.num_query_tokens), self.image_token_id)
        return torch.cat([image, input_ids], dim=1), torch.cat([torch.ones_like(image), attention_mask], dim=1)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.family == "blip2":
            ids, mask = self._with_image_tokens(input_ids, attention_mask)
            out = self.model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask)
            logits, pooled = out.logits[:, self.num_query_tokens :], out.qformer_outputs[0].mean(dim=1)
        else:
            out = self.model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
            logits, pooled = out.logits, out.image_embeds[:, 0]
        if self.vocab_head is None:
            return logits, None
        return logits, self.vocab_head(pooled.to(self.vocab_head.weight.dtype))

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, max_new_tokens: int | None = None, **kwargs) -> list[str]:
        """Greedy (num_beams=1) or beam-search decoding to text; ``kwargs`` (num_beams, no_repeat_ngram_size:
        small captioners loop on "by X, by X", ...) override ``self.generation`` and go to transformers."""
        settings = {**self.generation, **{k: v for k, v in kwargs.items() if v is not None}}
        settings.update(max_new_tokens=max_new_tokens or self.max_length, do_sample=False)
        if self.family == "blip2":
            bos = torch.full(
                (pixel_values.shape[0], 1),
                self.model.config.text_config.bos_token_id,
                dtype=torch.long,
                device=pixel_values.device,
            )
            prompt, mask = self._with_image_tokens(bos, torch.ones_like(bos))
            ids = self.model.generate(pixel_values=pixel_values, input_ids=prompt, attention_mask=mask, **settings)
            if ids.shape[1] >= prompt.shape[1] and torch.equal(ids[:, : prompt.shape[1]], prompt):
                ids = ids[:, prompt.shape[1] :]  # decoder-only generate returns the prompt too
        else:
            ids = self.model.generate(pixel_values=pixel_values, **settings)
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def config_dict(self) -> dict:
        """What rebuilds this captioner without the hub: the BLIP / BLIP-2 config itself is stored."""
        return {
            "captioner": self.name,
            "family": self.family,
            "variant": self.variant,
            "vocab_size": self.vocab_size,
            "max_length": self.max_length,
            "generation": self.generation,
            "blip_config": self.model.config.to_json_string(use_diff=False),
        }
