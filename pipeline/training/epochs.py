"""The epoch loop shared by train_model and preliminary_cosines: one run's model (DDP-wrapped under
torchrun), loaders, optimizer and schedule; an epoch with gradient accumulation, evaluation on each rank's
shard, and a checkpoint from rank 0.  What is specific to a model is the task's (pipeline.training.tasks)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from pipeline.training.checkpoint import save_checkpoint
from pipeline.training.config import TrainConfig
from pipeline.training.data import TrainingData, shard_loader
from pipeline.training.datasets import StageSampler, epoch_seed
from pipeline.training.device import autocast_dtype, init_distributed, resolve_device, seed_everything
from pipeline.training.optim import cosine_with_warmup, make_optimizer, trainable_parameters
from pipeline.training.tasks import TrainTask


class _Loop:
    """One training run's moving parts; shared by train_model and preliminary_cosines."""

    def __init__(
        self, model, data: TrainingData, config: TrainConfig, stages, epochs_per_stage, task: TrainTask, on_log
    ):
        self.config = config
        self.task = task
        self.data = data
        self.device = resolve_device(config.device)
        self.dist = init_distributed(self.device)
        self.amp = autocast_dtype(config.precision, self.device)
        self.unwrapped = model.to(self.device)
        task.setup(self, data["train"])
        self.model = self.unwrapped
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.unwrapped, device_ids=ids)
        self.stages = [np.asarray(s, dtype=np.int64) for s in stages]
        self.plan = [(s, e) for s in range(len(self.stages)) for e in range(epochs_per_stage)]
        world = self.dist.world_size
        if config.batch_size % world:
            raise ValueError(f"batch_size {config.batch_size} is not divisible by the {world} DDP ranks")
        self.rank_batch = config.batch_size // world
        self.accum = max(1, int(config.grad_accum_steps))
        self.num_workers = data.workers(config.num_workers)
        # The frozen prefix (CLIP tower, VAE) run once per dataset when the data has a cache directory.
        data.open(
            self.unwrapped,
            device=self.device,
            amp_dtype=self.amp,
            batch_size=config.eval_batch_size or self.rank_batch,
            num_workers=self.num_workers,
            dist=self.dist,
        )
        self.train_set = data.dataset("train")
        self.sampler = StageSampler(self.stages[0] if self.stages else [], True, config.seed, self.dist.rank, world)
        self.loader = data.loader(
            "train",
            self.rank_batch,
            seed=config.seed,
            num_workers=self.num_workers,
            sampler=self.sampler,
            pin_memory=self.device.type == "cuda",
        )
        self.total_steps = sum(self._steps_in(len(self.stages[s])) for s, _ in self.plan)
        self.optimizer = make_optimizer(self.unwrapped, config)
        warmup = int(round(config.warmup_fraction * self.total_steps))
        self.scheduler = cosine_with_warmup(self.optimizer, self.total_steps, warmup)
        self.on_log = on_log if self.dist.is_main else None
        self.step = 0
        self.embedding_dim: int | None = None
        self.identity: dict = {}  # backbone / recipe / settings_hash recorded in every checkpoint (train_model sets it)
        self._eval_loaders: dict[int, tuple[object, torch.utils.data.DataLoader]] = {}

    def _rank_samples(self, n_stage: int) -> int:
        return -(-n_stage // self.dist.world_size) if n_stage else 0

    def _steps_in(self, n_stage: int) -> int:
        micro = -(-self._rank_samples(n_stage) // self.rank_batch)
        return -(-micro // self.accum)

    def train_epoch(self, stage: int, epoch: int, on_batch: Callable | None = None) -> dict:
        """One epoch over stage ``stage``'s subset; returns loss / cosine / throughput figures."""
        cfg, dev = self.config, self.device
        self.sampler.set_stage(self.stages[stage])
        self.sampler.set_epoch(stage, epoch)
        self.loader.generator.manual_seed(epoch_seed(cfg.seed, stage, epoch, salt=10_000 + self.dist.rank))
        # Dropout and any other randomness of this epoch depend only on (seed, stage, epoch, rank).
        seed_everything(epoch_seed(cfg.seed, stage, epoch, salt=1 + self.dist.rank))
        self.model.train()
        n_rank = len(self.sampler)
        group_span = self.rank_batch * self.accum
        n_micro = len(self.loader)
        sums = {k: torch.zeros((), device=dev, dtype=torch.float64) for k in self.task.stat_keys}
        seen = 0
        wait = 0.0
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        started = time.perf_counter()
        iterator = iter(self.loader)
        self.optimizer.zero_grad(set_to_none=True)
        for i in range(n_micro):
            t_wait = time.perf_counter()
            batch = next(iterator)
            wait += time.perf_counter() - t_wait
            group_start = (i // self.accum) * group_span
            last_in_group = (i + 1) % self.accum == 0 or i == n_micro - 1
            sync = contextlib.nullcontext()
            if self.dist.enabled and not last_in_group:
                sync = self.model.no_sync()
            with sync:
                out = self.task.train_step(self, batch)
                weight = out.size / min(group_span, n_rank - group_start)  # mean over the whole group
                (out.loss * weight).backward()
            for key in self.task.stat_keys:
                sums[key] += out.sums[key]
            seen += out.size
            if on_batch is not None:
                on_batch(out.index, out.per_sample)
            if last_in_group:
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(trainable_parameters(self.unwrapped), cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                if self.on_log and cfg.log_every and self.step % cfg.log_every == 0:
                    self.on_log(
                        {
                            "event": "step",
                            "stage": stage,
                            "epoch": epoch,
                            "step": self.step,
                            "of": self.total_steps,
                            "loss": round(float(out.loss.detach()), 5),
                            "lr": self.scheduler.get_last_lr()[0],
                        }
                    )
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        elapsed = time.perf_counter() - started
        totals = torch.stack([*sums.values(), torch.tensor(float(seen), device=dev, dtype=torch.float64)])
        if self.dist.enabled:
            dist.all_reduce(totals)
        count = max(float(totals[-1]), 1.0)
        return {
            **{key: float(totals[k]) / count for k, key in enumerate(sums)},
            "images_per_s": float(totals[-1]) / max(elapsed, 1e-9),
            "data_wait_fraction": wait / max(elapsed, 1e-9),
            "gpu_mem_mb": (torch.cuda.max_memory_allocated(dev) / 2**20) if dev.type == "cuda" else 0.0,
            "seconds": elapsed,
        }

    def save(self, checkpoint_dir, progress: dict, index: int) -> str | None:
        """Checkpoint number ``index`` from rank 0 (the others wait); its weights path on rank 0, else None."""
        path = None
        if self.dist.is_main:
            path = str(
                save_checkpoint(
                    checkpoint_dir,
                    self.unwrapped,
                    self.optimizer,
                    self.scheduler,
                    progress=progress,
                    config=self.config.to_dict(),
                    index=index,
                    embedding_dim=self.embedding_dim,
                    keep_last=self.config.keep_checkpoints,
                    identity=self.identity,
                )
            )
        self.dist.barrier()
        return path

    def evaluate(self, dataset) -> float:
        """The task's validation metric on ``dataset`` (NaN without one)."""
        if dataset is None or len(dataset) == 0:
            return float("nan")
        return self.task.evaluate(self, dataset)

    def eval_loader(self, dataset):
        """This rank's shard of ``dataset`` in order; one loader per dataset, so its workers persist."""
        cached = self._eval_loaders.get(id(dataset))
        if cached is None or cached[0] is not dataset:
            loader = shard_loader(
                dataset,
                self.config.eval_batch_size or self.rank_batch,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
                num_workers=self.num_workers,
                pin_memory=self.device.type == "cuda",
            )
            self._eval_loaders[id(dataset)] = (dataset, loader)
        return self._eval_loaders[id(dataset)][1]

    def mean_over_ranks(self, total: torch.Tensor) -> float:
        """``total`` = (sum, count) of this rank's shard -> the mean over all ranks (NaN for no samples)."""
        if self.dist.enabled:
            dist.all_reduce(total)
        return float(total[0] / total[1]) if float(total[1]) else float("nan")
