"""Curriculum: difficulty, thirds, stage order, and that the trainer never shuffles hard samples into early stages."""

from __future__ import annotations

import numpy as np
import pytest
from test_training import cfg, make_loss, make_tiny_model, toy_data

from pipeline.training.curriculum import bucket_by_difficulty, curriculum_stages, difficulty_from_history
from pipeline.training.datasets import PairDataset, StageSampler
from pipeline.training.loop import train_model


def test_difficulty_is_mean_cosine_over_epochs_ignoring_unseen():
    history = np.array([[0.1, 0.5, np.nan], [0.3, 0.7, np.nan]])
    d = difficulty_from_history(history)
    assert d[:2] == pytest.approx([0.2, 0.6])
    assert d[2] == -np.inf  # never seen -> hardest, not easy


@pytest.mark.parametrize("n, sizes", [(9, (3, 3, 3)), (10, (4, 3, 3)), (11, (4, 4, 3)), (2, (1, 1, 0))])
def test_buckets_are_thirds_by_rank(n, sizes):
    rng = np.random.default_rng(n)
    d = rng.normal(size=n)
    buckets = bucket_by_difficulty(d)
    assert tuple(int((buckets == b).sum()) for b in ("easy", "medium", "hard")) == sizes
    easy, medium, hard = (d[buckets == b] for b in ("easy", "medium", "hard"))
    if len(medium):
        assert easy.min() >= medium.max()
    if len(hard) and len(medium):
        assert medium.min() >= hard.max()


def test_ties_are_broken_by_index():
    buckets = bucket_by_difficulty(np.zeros(6))
    assert list(buckets) == ["easy", "easy", "medium", "medium", "hard", "hard"]


def test_thresholds_instead_of_thirds():
    buckets = bucket_by_difficulty(np.array([0.9, 0.5, 0.1]), thirds=False, thresholds=(0.3, 0.8))
    assert list(buckets) == ["easy", "medium", "hard"]


def test_stages_grow_easy_then_medium_then_all_twice():
    buckets = np.array(["hard", "easy", "medium", "easy", "hard", "medium"], dtype=object)
    stages = curriculum_stages(buckets)
    assert [s.tolist() for s in stages] == [[1, 3], [1, 2, 3, 5], list(range(6)), list(range(6))]
    allowed = [{"easy"}, {"easy", "medium"}, {"easy", "medium", "hard"}, {"easy", "medium", "hard"}]
    for stage, ok in zip(stages, allowed):
        assert set(buckets[stage]) <= ok
    with pytest.raises(ValueError, match="unknown"):
        curriculum_stages(np.array(["easy", "trivial"], dtype=object))


def test_stage_sampler_shuffles_only_within_the_stage_and_is_seeded():
    stage = np.array([3, 7, 11, 20, 21, 40, 41])
    sampler = StageSampler(stage, seed=5)
    sampler.set_epoch(0, 0)
    first = list(sampler)
    assert sorted(first) == stage.tolist() and first != stage.tolist()
    assert list(sampler) == first  # same (seed, stage, epoch) -> same order
    sampler.set_epoch(0, 1)
    assert list(sampler) != first and sorted(sampler) == stage.tolist()


@pytest.mark.parametrize("world", [2, 3])
def test_stage_sampler_splits_a_stage_across_ranks(world):
    stage = np.arange(100, 110)  # 10 samples
    shards = []
    for rank in range(world):
        s = StageSampler(stage, seed=1, rank=rank, world_size=world)
        s.set_epoch(2, 0)
        shards.append(list(s))
    assert len({len(x) for x in shards}) == 1  # equal steps on every rank
    union = [i for shard in shards for i in shard]
    assert set(union) == set(stage.tolist())  # every stage sample, nothing from outside
    assert len(union) - len(set(union)) == len(shards[0]) * world - len(stage)  # only the padding repeats


class RecordingDataset(PairDataset):
    """Remembers which rows the loader asked for."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[int] = []

    def __getitem__(self, index):
        self.seen.append(int(index))
        return super().__getitem__(index)


def test_trainer_sees_only_the_stage_subset_in_each_stage(tmp_path):
    model = make_tiny_model(0)
    images, targets, labels = toy_data(24)
    train = RecordingDataset(images, targets, labels, image_size=32, mean=model.mean, std=model.std, vocab_size=6)
    difficulty = np.random.default_rng(0).normal(size=24)
    buckets = bucket_by_difficulty(difficulty)
    stages = curriculum_stages(buckets)
    per_epoch: list[list[int]] = []

    def on_log(record):
        if record.get("event") == "epoch":
            per_epoch.append(train.seen.copy())
            train.seen.clear()

    result = train_model(
        model,
        train,
        None,
        cfg(batch_size=4, stage_epochs=1),
        tmp_path,
        stages=stages,
        on_log=on_log,
        loss_fn=make_loss(),
    )
    assert [h["stage"] for h in result.history] == [0, 1, 2, 3]
    assert [h["stage_size"] for h in result.history] == [8, 16, 24, 24]
    allowed = [{"easy"}, {"easy", "medium"}, {"easy", "medium", "hard"}, {"easy", "medium", "hard"}]
    for seen, stage, ok in zip(per_epoch, stages, allowed):
        assert sorted(seen) == sorted(stage.tolist())  # each stage sample exactly once, nothing else
        assert set(buckets[seen]) <= ok
    assert per_epoch[2] != per_epoch[3]  # the final pass is reshuffled, within the stage
