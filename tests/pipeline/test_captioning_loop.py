"""The captioner on the shared training loop: it keeps its best epoch (lowest val LM loss), a killed run
resumes to the same selection and weights, and gradient accumulation matches a bigger batch.  CPU, seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_captioning import noisy_png

from pipeline.captioning import (
    CaptionDataset,
    CaptionTrainConfig,
    create_captioner,
    evaluate_lm,
    fit_captioner,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RED, BLUE = "a red circle", "a blue square"  # the same number of tokens: token and sample means agree


def _pairs():
    images = [noisy_png((220, 30, 30), i) for i in range(4)] + [noisy_png((30, 30, 220), 10 + i) for i in range(4)]
    labels = [np.array([0, 1])] * 4 + [np.array([2, 3])] * 4
    return images, [RED] * 4 + [BLUE] * 4, labels


@pytest.fixture(scope="module")
def pairs():
    return _pairs()


def _setup(pairs, swapped_val: bool = False):
    images, prompts, labels = pairs
    torch.manual_seed(0)
    captioner = create_captioner("blip", variant="tiny", vocab_size=4, corpus=[RED, BLUE])
    train = CaptionDataset(images, prompts, labels, captioner)
    # the wrong prompt for each image: the better the captioner learns, the worse its val LM loss
    val_prompts = prompts[4:] + prompts[:4] if swapped_val else prompts
    val = CaptionDataset(images, val_prompts, labels, captioner)
    return captioner, train, val


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


CONFIG = dict(epochs=6, batch_size=4, lr=1e-2, warmup_fraction=0.0, lambda_vocab=0.5, device="cpu", log_every=0)


def test_captioner_keeps_its_best_epoch_and_a_killed_run_resumes_to_the_same_selection(pairs, tmp_path):
    config = CaptionTrainConfig(**CONFIG)
    captioner, train, val = _setup(pairs, swapped_val=True)
    whole = fit_captioner(captioner, train, config, val_set=val, checkpoint_dir=str(tmp_path / "whole"))
    val_lm = [h["val_lm"] for h in whole.history]
    selected = whole.extra["selected_epoch"]
    assert len(val_lm) == 6 and selected == int(np.argmin(val_lm)) and selected < 5  # not simply the last epoch
    assert whole.extra["best_val_lm"] == whole.extra["final_val_lm"] == min(val_lm)
    # the captioner holds the selected epoch's weights, not the last epoch's
    assert evaluate_lm(captioner, val) == pytest.approx(val_lm[selected], rel=1e-4)
    selected_weights = _weights(captioner)

    class Killed(Exception):
        pass

    def kill_after_the_best(stage, epoch, index, per_sample):
        if epoch == selected + 1:
            raise Killed

    captioner, train, val = _setup(pairs, swapped_val=True)
    with pytest.raises(Killed):
        fit_captioner(
            captioner, train, config, val_set=val, on_batch=kill_after_the_best, checkpoint_dir=str(tmp_path / "k")
        )
    epochs_run: list[int] = []
    captioner, train, val = _setup(pairs, swapped_val=True)
    resumed = fit_captioner(
        captioner,
        train,
        config,
        val_set=val,
        on_batch=lambda stage, epoch, *_: epochs_run.append(epoch),
        checkpoint_dir=str(tmp_path / "k"),
    )
    # the epochs up to the best came from the checkpoint, the best weights from the file kept beside it
    assert set(epochs_run) == set(range(selected + 1, 6)) and resumed.resumed_epochs == selected + 1
    assert resumed.extra["selected_epoch"] == selected
    assert [h["val_lm"] for h in resumed.history] == val_lm
    for name, value in _weights(captioner).items():
        assert torch.equal(value, selected_weights[name]), name


def test_captioner_gradient_accumulation_matches_a_bigger_batch(pairs, tmp_path):
    results = []
    for batch, accum in [(4, 1), (2, 2)]:
        captioner, train, _ = _setup(pairs)
        config = CaptionTrainConfig(**{**CONFIG, "epochs": 1, "batch_size": batch, "grad_accum_steps": accum})
        result = fit_captioner(captioner, train, config, checkpoint_dir=str(tmp_path / str(batch)))
        assert result.extra["total_steps"] == 2  # 8 samples in optimizer steps of 4 either way
        results.append(_weights(captioner))
    initial = _weights(_setup(pairs)[0])
    assert any(not torch.equal(results[0][k], initial[k]) for k in initial)
    for k in results[0]:
        assert torch.allclose(results[0][k], results[1][k], atol=1e-5, rtol=1e-4), k


_RANK_SCRIPT = """
import os, sys
import numpy as np, torch
sys.path.insert(0, sys.argv[2])
torch.set_num_threads(1)
import test_captioning_loop as t
from pipeline.captioning import fit_captioner
captioner, train, val = t._setup(t._pairs())
result = fit_captioner(captioner, train, t.DDP_CONFIG, val_set=val, checkpoint_dir=sys.argv[1] + "-ckpt")
if os.environ["RANK"] == "0":
    torch.save({"weights": captioner.state_dict(), "extra": result.extra}, sys.argv[1])
"""
DDP_CONFIG = CaptionTrainConfig(**{**CONFIG, "epochs": 1, "precision": "fp32"})


@pytest.mark.extended
def test_captioner_trains_under_two_process_ddp_like_one_process(pairs, tmp_path):
    """torchrun, 2 ranks, gloo on CPU: the replicas agree and match one process over the same global batches."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parents[1]), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    out = tmp_path / "ddp.pt"
    run = subprocess.run([*command, str(script), str(out), str(tests)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    ddp = torch.load(out, weights_only=False)
    assert ddp["extra"]["world_size"] == 2 and ddp["extra"]["replica_max_abs_diff"] == 0.0

    captioner, train, val = _setup(pairs)
    single = fit_captioner(captioner, train, DDP_CONFIG, val_set=val, checkpoint_dir=str(tmp_path / "single"))
    assert single.extra["total_steps"] == ddp["extra"]["total_steps"]
    assert ddp["extra"]["final_val_lm"] == pytest.approx(single.extra["final_val_lm"], rel=1e-5)
    for name, value in captioner.state_dict().items():
        assert torch.allclose(ddp["weights"][name], value, atol=1e-5), name
