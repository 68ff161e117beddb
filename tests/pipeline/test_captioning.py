"""The tiny BLIP captioner (vocabulary head, loss, training, curriculum order, generation, checkpoints) and the
generated-prompt scores (SBERT cosine, CLIP-S, RefCLIPScore) against hand computations.  CPU, seconds."""

from __future__ import annotations

import io

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.captioning import (
    CAPTIONERS,
    KAGGLE_FIRST_PLACE,
    CaptionDataset,
    Captioner,
    CaptionTrainConfig,
    caption_loss,
    caption_table,
    clip_s,
    combined_difficulty,
    create_captioner,
    evaluate_lm,
    generate_prompts,
    load_captioner,
    load_clip_scorer,
    minilm_tokenizer,
    preliminary_loss_history,
    ref_clip_s,
    report_rows,
    save_captioner,
    sbert_cosines,
    train_captioner,
)
from pipeline.training.curriculum import bucket_by_difficulty, curriculum_stages

RED = "a red circle on a white background, highly detailed"
BLUE = "two blue squares, black background, by greg rutkowski"
K = 5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def noisy_png(rgb, seed: int, size: int = 32) -> bytes:
    """A PNG of colour ``rgb`` with Gaussian noise (seeded)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(rgb)[None, None, :] + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pairs():
    """Four noisy red images with one prompt, four blue ones with another; vocabulary labels per colour."""
    images = [noisy_png((220, 30, 30), i) for i in range(4)] + [noisy_png((30, 30, 220), 10 + i) for i in range(4)]
    prompts = [RED] * 4 + [BLUE] * 4
    labels = [np.array([0, 1])] * 4 + [np.array([2, 3])] * 4
    return images, prompts, labels


def _batch(data: CaptionDataset, rows) -> tuple[torch.Tensor, ...]:
    """(pixels, input_ids, attention_mask, vocabulary labels) of ``rows``, trimmed to the longest prompt."""
    pixels, ids, mask, labels = (torch.stack([data[i][j] for i in rows]) for j in range(4))
    n = int(mask.sum(1).max())
    return pixels, ids[:, :n], mask[:, :n], labels


def _captioner(prompts, vocab_size: int = K, seed: int = 0, name: str = "blip"):
    torch.manual_seed(seed)
    return create_captioner(name, variant="tiny", vocab_size=vocab_size, corpus=prompts)


def test_registry_and_variants():
    assert CAPTIONERS.names() == ["blip", "blip2"] == sorted(CAPTIONERS)
    with pytest.raises(ValueError, match="unknown captioner"):
        create_captioner("pez")
    with pytest.raises(ValueError, match="only for variant 'full'"):
        create_captioner("blip", variant="tiny", pretrained=True)
    with pytest.raises(ValueError, match="unknown variant"):
        create_captioner("blip", variant="huge")


def test_tiny_tokenizer_is_blips_restricted_to_the_corpus(pairs):
    _, prompts, _ = pairs
    captioner = _captioner(prompts)
    tokenizer, base = captioner.tokenizer, minilm_tokenizer()
    assert tokenizer.bos_token == "[DEC]" and "[ENC]" in tokenizer.all_special_tokens
    assert len(tokenizer) < 40  # the corpus' tokens + specials, not 30,524
    for prompt in (RED, BLUE):  # the corpus tokenizes exactly as with the full vocabulary
        assert tokenizer.tokenize(prompt) == base.tokenize(prompt)
        ids, mask = captioner.encode_text([prompt])
        assert ids[0, 0] == tokenizer.bos_token_id  # [DEC] replaces [CLS], as BLIP was pre-trained
        text = tokenizer.decode(ids[0][mask[0].bool()], skip_special_tokens=True)
        assert text == prompt
    assert captioner.model.config.text_config.vocab_size == len(tokenizer)


def test_forward_shapes_and_joint_loss_by_hand(pairs):
    images, prompts, labels = pairs
    captioner = _captioner(prompts).eval()
    data = CaptionDataset(images, prompts, labels, captioner)
    pixels, ids, mask, vocab = _batch(data, (0, 5))
    n = ids.shape[1]
    token_logits, vocab_logits = captioner(pixels, ids, mask)
    assert token_logits.shape == (2, n, len(captioner.tokenizer)) and vocab_logits.shape == (2, K)
    assert vocab.tolist() == [[1, 1, 0, 0, 0], [0, 0, 1, 1, 0]]
    total, parts, per_sample = caption_loss(token_logits, ids, mask, vocab_logits, vocab, lambda_vocab=0.5)
    # by hand: position t predicts token t+1; padding positions are not targets
    expected = []
    for row in range(2):
        length = int(mask[row].sum())
        expected.append(F.cross_entropy(token_logits[row, : length - 1], ids[row, 1:length]).item())
    assert per_sample.tolist() == pytest.approx(expected, rel=1e-5)
    counts = mask[:, 1:].sum(1).float()
    assert parts["lm"].item() == pytest.approx(float((torch.tensor(expected) * counts).sum() / counts.sum()), rel=1e-5)
    bce = F.binary_cross_entropy_with_logits(vocab_logits, vocab).item()
    assert parts["bce"].item() == pytest.approx(bce, rel=1e-5)
    assert total.item() == pytest.approx(parts["lm"].item() + 0.5 * bce, rel=1e-5)
    # the vocabulary head learns from the BCE term only: no gradient at lambda 0
    total0, _, _ = caption_loss(token_logits, ids, mask, vocab_logits, vocab, lambda_vocab=0.0)
    total0.backward()
    assert captioner.vocab_head.weight.grad is None or captioner.vocab_head.weight.grad.abs().sum() == 0
    captioner.zero_grad()
    token_logits, vocab_logits = captioner(pixels, ids, mask)
    caption_loss(token_logits, ids, mask, vocab_logits, vocab, lambda_vocab=0.5)[0].backward()
    assert captioner.vocab_head.weight.grad.abs().sum() > 0


def test_training_reduces_loss_and_generation_follows_the_image(pairs, tmp_path):
    images, prompts, labels = pairs
    captioner = _captioner(prompts)
    data = CaptionDataset(images, prompts, labels, captioner)
    before = evaluate_lm(captioner, data)
    config = CaptionTrainConfig(epochs=12, batch_size=4, lr=3e-3, warmup_fraction=0.0, lambda_vocab=1.0, device="cpu")
    history = train_captioner(captioner, data, config, val_set=data)
    after = evaluate_lm(captioner, data)
    assert len(history) == 12 and history[-1]["train_loss"] < history[0]["train_loss"]
    assert after < 0.5 * before
    generated = generate_prompts(captioner, images, batch_size=3, device="cpu")
    assert all(isinstance(g, str) for g in generated) and len(generated) == len(images)
    # conditioned on the image: red images get the red prompt, blue ones the blue prompt
    assert generated == prompts
    beams = generate_prompts(captioner, images[:2], num_beams=2, device="cpu", no_repeat_ngram_size=2)
    assert len(beams) == 2 and all(isinstance(g, str) and g for g in beams)
    # a checkpoint rebuilds the same captioner without the hub: same logits, same text
    save_captioner(captioner, str(tmp_path / "blip"), progress={"history": history})
    loaded = load_captioner(str(tmp_path / "blip"))
    assert len(loaded.tokenizer) == len(captioner.tokenizer)
    assert generate_prompts(loaded, images[:2], device="cpu") == generated[:2]
    pixels, ids, mask, _ = _batch(data, (0, 7))
    captioner.eval()
    with torch.no_grad():
        assert torch.equal(loaded(pixels, ids, mask)[0], captioner(pixels, ids, mask)[0])
        assert torch.equal(loaded(pixels, ids, mask)[1], captioner(pixels, ids, mask)[1])


def test_curriculum_order_is_respected(pairs):
    images, prompts, labels = pairs
    captioner = _captioner(prompts)
    data = CaptionDataset(images, prompts, labels, captioner)
    difficulty = np.array([0.9, 0.1, 0.5, 0.8, 0.2, 0.6, 0.3, 0.7])  # easy: 0,3,7  medium: 5,2,6  hard: 4,1
    buckets = bucket_by_difficulty(difficulty)
    stages = curriculum_stages(buckets)
    seen: dict[int, set[int]] = {}
    order: list[tuple[int, int]] = []

    def on_batch(stage, epoch, index, per_sample):
        seen.setdefault(stage, set()).update(int(i) for i in index)
        order.extend((stage, int(i)) for i in index)
        assert per_sample.shape == (len(index),) and torch.isfinite(per_sample).all()

    config = CaptionTrainConfig(stage_epochs=2, batch_size=2, lr=1e-3, device="cpu")
    history = train_captioner(captioner, data, config, stages=stages, on_batch=on_batch)
    assert [h["stage"] for h in history] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert seen[0] == {0, 3, 7}
    assert seen[1] == {0, 3, 7, 5, 2, 6}
    assert seen[2] == seen[3] == set(range(8))
    first_hard = min(k for k, (_, i) in enumerate(order) if i in (1, 4))
    assert all(stage >= 2 for stage, _ in order[first_hard:])
    with pytest.raises(ValueError, match="at least one sample"):
        train_captioner(captioner, data, config, stages=[np.array([], dtype=int)])


def test_a_killed_captioner_run_resumes_to_the_uninterrupted_weights(pairs, tmp_path):
    images, prompts, labels = pairs
    stages = curriculum_stages(bucket_by_difficulty(np.array([0.9, 0.1, 0.5, 0.8, 0.2, 0.6, 0.3, 0.7])))
    config = CaptionTrainConfig(stage_epochs=1, batch_size=2, lr=1e-3, lambda_vocab=0.5, device="cpu")

    def run(directory, on_batch=None, captioner_config=config):
        captioner = _captioner(prompts)
        data = CaptionDataset(images, prompts, labels, captioner)
        history = train_captioner(
            captioner, data, captioner_config, stages=stages, on_batch=on_batch, checkpoint_dir=str(directory)
        )
        return captioner, history

    whole, whole_history = run(tmp_path / "whole")

    class Killed(Exception):
        pass

    def kill_in_stage_2(stage, epoch, index, per_sample):
        if stage == 2:
            raise Killed

    with pytest.raises(Killed):
        run(tmp_path / "killed", kill_in_stage_2)
    stages_run = []
    resumed, history = run(tmp_path / "killed", lambda stage, *_: stages_run.append(stage))
    assert set(stages_run) == {2, 3}  # stages 0 and 1 came from the checkpoint
    assert [h["train_loss"] for h in history] == [h["train_loss"] for h in whole_history]
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    # progress from other settings is not resumed: the run starts over
    stages_run.clear()
    run(
        tmp_path / "killed",
        lambda stage, *_: stages_run.append(stage),
        CaptionTrainConfig(**{**config.__dict__, "lr": 2e-3}),
    )
    assert stages_run[0] == 0


def test_own_preliminary_pass_gives_minus_loss_per_sample(pairs):
    images, prompts, labels = pairs
    captioner = _captioner(prompts)
    data = CaptionDataset(images, prompts, labels, captioner)
    history = preliminary_loss_history(captioner, data, CaptionTrainConfig(batch_size=4, device="cpu"), epochs=2)
    assert history.shape == (2, 8) and np.isfinite(history).all() and (history < 0).all()


def test_combined_difficulty_rank_averages_and_keeps_unscored_hardest():
    a = np.array([0.9, 0.1, 0.5, np.nan])
    b = np.array([10.0, 30.0, 20.0, np.nan])  # another scale: only ranks count
    combined = combined_difficulty([a, b])
    assert combined[:3].tolist() == pytest.approx([(1.0 + 0.0) / 2, (0.0 + 1.0) / 2, (0.5 + 0.5) / 2])
    assert combined[3] == -np.inf
    assert combined_difficulty([np.array([0.3, np.nan, 0.7]), np.array([np.nan, 5.0, np.nan])]).tolist() == [0, 0.5, 1]


def test_sbert_cosine_by_hand():
    generated = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    targets = np.array([[4.0, 3.0], [-1.0, 0.0], [0.0, 5.0]])
    assert sbert_cosines(generated, targets).tolist() == pytest.approx([24 / 25, -1.0, 1.0])


def test_clip_s_and_ref_clip_s_by_hand():
    image = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    candidate = np.array([[0.6, 0.8], [-0.6, 0.8], [0.0, 1.0]])
    # references: two per image; the max cosine to the candidate counts
    refs = np.array([[[0.6, 0.8], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]], [[0.0, -1.0], [0.0, -3.0]]])
    assert clip_s(image, candidate).tolist() == pytest.approx([2.5 * 0.6, 0.0, 2.5])
    # row 0: CLIP-S 1.5, ref 1.0 -> 2 * 1.5 * 1 / 2.5;  row 1: CLIP-S 0 -> 0;  row 2: ref clipped to 0 -> 0
    assert ref_clip_s(image, candidate, refs).tolist() == pytest.approx([1.2, 0.0, 0.0])
    # one reference per image, given as [n, d]
    assert ref_clip_s(image[:1], candidate[:1], np.array([[1.0, 0.0]])).tolist() == pytest.approx(
        [2 * 1.5 * 0.6 / (1.5 + 0.6)]
    )


def test_caption_table_scores_each_image_against_its_true_prompt():
    from types import SimpleNamespace

    class Scorer:  # CLIP stand-in: fixed 2-d embeddings
        def image_embeddings(self, images):
            return np.array([[1.0, 0.0], [0.0, 1.0]])

        def text_embeddings(self, texts):
            table = {"red": [1.0, 0.0], "blue": [0.0, 1.0], "pink": [0.8, 0.6]}
            return np.array([table[t] for t in texts])

    pairs = SimpleNamespace(
        image_ids=["a", "b"], images=[b"", b""], prompts=["red", "blue"], targets=np.array([[1.0, 0.0], [0.6, 0.8]])
    )
    table = caption_table(pairs, ["pink", "red"], np.array([[2.0, 0.0], [0.0, 1.0]]), Scorer())
    assert table["generated"].to_list() == ["pink", "red"]
    assert table["sbert_cosine"].to_list() == pytest.approx([1.0, 0.8])
    assert table["clip_s"].to_list() == pytest.approx([2.5 * 0.8, 0.0])
    assert table["refclip_s"].to_list() == pytest.approx([2 * 2.0 * 0.8 / 2.8, 0.0])
    assert table["embedding"].to_numpy().shape == (2, 2)
    with pytest.raises(ValueError, match="1 generated prompts for 2 images"):
        caption_table(pairs, ["pink"], np.zeros((1, 2)), Scorer())


def test_tiny_clip_scorer_is_deterministic_and_consistent(pairs):
    images, prompts, _ = pairs
    a, b = load_clip_scorer("tiny", seed=0), load_clip_scorer("tiny", seed=0)
    img, txt = a.image_embeddings(images[:3]), a.text_embeddings(prompts[:3])
    assert img.shape == (3, 32) and txt.shape == (3, 32)
    assert np.allclose(np.linalg.norm(img, axis=1), 1) and np.allclose(np.linalg.norm(txt, axis=1), 1)
    assert np.allclose(img, b.image_embeddings(images[:3])) and np.allclose(txt, b.text_embeddings(prompts[:3]))
    # a PIL image scores as its PNG bytes do
    pil = Image.open(io.BytesIO(images[0]))
    assert np.allclose(a.image_embeddings([pil]), img[:1], atol=1e-6)
    # candidate == reference: the reference term is 1, so RefCLIPScore = 2c / (c + 1) of CLIP-S c
    c = clip_s(img, txt)
    assert ref_clip_s(img, txt, txt) == pytest.approx(np.where(c > 0, 2 * c / (c + 1), 0.0))


def test_report_rows():
    frame = pl.DataFrame({"sbert_cosine": [0.5, 0.7], "clip_s": [0.2, 0.4], "refclip_s": [0.1, 0.3]})
    rows = report_rows({"blip": frame}, {"blip": "tiny"})
    assert rows == [
        {
            "captioner": "blip",
            "variant": "tiny",
            "sbert_cosine": pytest.approx(0.6),
            "refclip_score": pytest.approx(0.2),
            "clip_s": pytest.approx(0.3),
            "test_images": 2,
            "kaggle_first_place": KAGGLE_FIRST_PLACE,
        }
    ]


def _full_from_saved_tiny(name: str, pairs, tmp_path):
    """The hub path (from_pretrained of model and tokenizer) run offline on a save_pretrained directory of the
    tiny twin: the "full" captioner built from it gives the same logits."""
    images, prompts, _ = pairs
    tiny = _captioner(prompts, name=name).eval()
    tiny.model.save_pretrained(tmp_path / name)
    tiny.tokenizer.save_pretrained(tmp_path / name)
    full = create_captioner(name, variant="full", pretrained=True, weights=str(tmp_path / name), vocab_size=K)
    assert full.variant == "full" and full.max_length == 77 and full.image_size == tiny.image_size
    full.vocab_head.load_state_dict(tiny.vocab_head.state_dict())
    pixels, ids, mask, _ = _batch(CaptionDataset(images, prompts, None, tiny), (0, 4))
    with torch.no_grad():
        assert torch.allclose(full(pixels, ids, mask)[0], tiny(pixels, ids, mask)[0])
    return tiny, full


def test_full_variant_loads_like_the_hub_from_a_local_directory(pairs, tmp_path):
    """The hub path (from_pretrained of model, tokenizer and CLIP) run offline on save_pretrained directories."""
    images, prompts, _ = pairs
    _full_from_saved_tiny("blip", pairs, tmp_path)
    scorer = load_clip_scorer("tiny", seed=3)
    scorer.model.save_pretrained(tmp_path / "clip")
    scorer.tokenizer.save_pretrained(tmp_path / "clip")
    loaded = load_clip_scorer("full", source=str(tmp_path / "clip"))
    assert np.allclose(loaded.text_embeddings(prompts[:2]), scorer.text_embeddings(prompts[:2]), atol=1e-6)
    assert np.allclose(loaded.image_embeddings(images[:2]), scorer.image_embeddings(images[:2]), atol=1e-6)


# -- BLIP-2 ----------------------------------------------------------------------------------------------------
def test_blip2_text_layout_image_tokens_and_frozen_language_model(pairs):
    _, prompts, _ = pairs
    captioner = _captioner(prompts, name="blip2")
    assert captioner.family == "blip2" and captioner.num_query_tokens == 4
    tokenizer, text = captioner.tokenizer, captioner.model.config.text_config
    ids, mask = captioner.encode_text([RED, BLUE])
    for row, m, prompt in zip(ids, mask, (RED, BLUE)):
        kept = row[m.bool()].tolist()
        assert kept[0] == text.bos_token_id and kept[-1] == text.eos_token_id
        assert tokenizer.decode(kept, skip_special_tokens=True) == prompt
    assert captioner.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert "<image>" in tokenizer.all_special_tokens

    # a random-init LM trains; BLIP-2's recipe for a pre-trained one freezes it, and only it
    def trainable(c):
        return {".".join(n.split(".")[:2]) for n, p in c.named_parameters() if p.requires_grad}

    assert "model.language_model" in trainable(captioner)
    frozen = Captioner(
        captioner.model,
        tokenizer,
        name="blip2",
        variant="tiny",
        vocab_size=K,
        max_length=48,
        freeze_language_model=True,
    )
    assert trainable(frozen) == {
        "model.vision_model",
        "model.query_tokens",
        "model.qformer",
        "model.language_projection",
        "vocab_head.weight",
        "vocab_head.bias",
    }
    captioner.model.language_model.requires_grad_(True)
    pixels, ids, mask, labels = _batch(CaptionDataset(pairs[0], prompts, pairs[2], captioner), (0, 4, 5))
    token_logits, vocab_logits = captioner(pixels, ids, mask)
    assert token_logits.shape == (3, ids.shape[1], len(tokenizer))  # text positions only, image tokens dropped
    assert vocab_logits.shape == (3, K)
    # the text logits are the language model's at the positions after the image placeholders
    full_ids, full_mask = captioner._with_image_tokens(ids, mask)
    assert (full_ids[:, :4] == captioner.image_token_id).all() and torch.equal(full_ids[:, 4:], ids)
    captioner.eval()  # no dropout: the two forward passes must agree
    with torch.no_grad():
        raw = captioner.model(pixel_values=pixels, input_ids=full_ids, attention_mask=full_mask).logits
        assert torch.allclose(raw[:, 4:], captioner(pixels, ids, mask)[0])


def test_blip2_learns_the_prompts_saves_and_loads(pairs, tmp_path):
    images, prompts, labels = pairs
    captioner = _captioner(prompts, name="blip2")
    data = CaptionDataset(images, prompts, labels, captioner)
    before = evaluate_lm(captioner, data)
    config = CaptionTrainConfig(epochs=12, batch_size=4, lr=3e-3, warmup_fraction=0.0, lambda_vocab=1.0, device="cpu")
    history = train_captioner(captioner, data, config, val_set=data)
    assert evaluate_lm(captioner, data) < 0.5 * before and history[-1]["train_bce"] < history[0]["train_bce"]
    generated = generate_prompts(captioner, images, batch_size=4, device="cpu")
    assert generated == prompts  # conditioned on the image alone
    save_captioner(captioner, str(tmp_path / "blip2"), progress={"history": history})
    loaded = load_captioner(str(tmp_path / "blip2"))
    assert loaded.family == "blip2" and generate_prompts(loaded, images[:3], device="cpu") == generated[:3]
    pixels, ids, mask, _ = _batch(data, (1, 6))
    captioner.eval()
    with torch.no_grad():
        assert torch.equal(loaded(pixels, ids, mask)[0], captioner(pixels, ids, mask)[0])
    # with the LM frozen (the pre-trained recipe) training leaves it exactly as it was
    frozen = Captioner(
        loaded.model,
        loaded.tokenizer,
        name="blip2",
        variant="tiny",
        vocab_size=K,
        max_length=48,
        freeze_language_model=True,
    )
    frozen.vocab_head = loaded.vocab_head
    language_model = {k: v.clone() for k, v in frozen.model.language_model.state_dict().items()}
    qformer = {k: v.clone() for k, v in frozen.model.qformer.state_dict().items()}
    train_captioner(
        frozen,
        CaptionDataset(images, prompts, labels, frozen),
        CaptionTrainConfig(epochs=1, batch_size=4, device="cpu"),
    )
    assert all(torch.equal(v, language_model[k]) for k, v in frozen.model.language_model.state_dict().items())
    assert any(not torch.equal(v, qformer[k]) for k, v in frozen.model.qformer.state_dict().items())


def test_blip2_full_variant_loads_like_the_hub_from_a_local_directory(pairs, tmp_path):
    tiny, full = _full_from_saved_tiny("blip2", pairs, tmp_path)
    assert full.image_token_id == tiny.image_token_id
    assert full.freeze_language_model and not any(p.requires_grad for p in full.model.language_model.parameters())
