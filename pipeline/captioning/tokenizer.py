"""Captioner tokenizers: BLIP's tokenizer rebuilt offline from the all-MiniLM-L6-v2 package's WordPiece.

BLIP's tokenizer is BERT-uncased plus two added tokens ([DEC] as BOS, [ENC]); the offline MiniLM package
ships the same BERT-uncased WordPiece.  Given the training prompts, the tiny tokenizer keeps only the tokens
they use: the full 30,524-wide output layer dominated a CPU training step, and greedy longest-match
WordPiece tokenizes every training prompt identically with the reduced vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

IMAGE_TOKEN = "<image>"  # BLIP-2's placeholder for the Q-Former's query outputs in the LM's input


def minilm_tokenizer():
    """The BERT-uncased WordPiece tokenizer of the offline all-MiniLM-L6-v2 package."""
    from transformers import AutoTokenizer

    from pipeline.data.embedding import resolve_model_location

    return AutoTokenizer.from_pretrained(resolve_model_location(None))


def add_blip_tokens(tokenizer):
    """BLIP's tokenizer = BERT-uncased + [DEC] (the decoder's BOS) + [ENC]."""
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def restrict_vocabulary(base, corpus: Sequence[str]):
    """A WordPiece tokenizer keeping only the special tokens and the tokens ``base`` uses on ``corpus``.

    Greedy longest-match WordPiece picks, for every word of the corpus, pieces that are all kept, and no
    longer kept prefix exists that ``base`` would not have picked, so the corpus tokenizes identically.
    Unseen words may split differently or become [UNK].  Ids are renumbered densely in the base order.
    """
    from transformers import BertTokenizer

    used: set[int] = set(base.all_special_ids)
    for start in range(0, len(corpus), 1024):
        for ids in base(list(corpus[start : start + 1024]), add_special_tokens=False)["input_ids"]:
            used.update(ids)
    vocab = {base.convert_ids_to_tokens(i): n for n, i in enumerate(sorted(used))}
    return BertTokenizer(vocab=vocab, do_lower_case=True, clean_up_tokenization_spaces=True)


def tiny_tokenizer(corpus: Sequence[str] | None = None):
    """BLIP's tokenizer rebuilt offline: MiniLM's WordPiece (restricted to ``corpus`` when given) + BLIP tokens."""
    base = minilm_tokenizer()
    tokenizer = restrict_vocabulary(base, corpus) if corpus is not None else base
    return add_blip_tokens(tokenizer)


def with_image_token(tokenizer):
    """The tokenizer with BLIP-2's image placeholder as a special token (decoding skips it)."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        extra = [t for t in getattr(tokenizer, "additional_special_tokens", None) or [] if t != IMAGE_TOKEN]
        tokenizer.add_special_tokens({"additional_special_tokens": [*extra, IMAGE_TOKEN]})
    return tokenizer
