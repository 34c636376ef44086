"""Training loop: an objective's loss (diffusion/) on a token-reduction method's network (tread_bench/methods/), AdamW,
EMA, accelerate, checkpoints, NaN guard. The loop calls only the objective and method interfaces.

A step never makes the host wait for the device: the loss stays on the device and is read (and checked finite) every
``log_every`` steps and before an evaluation or a checkpoint; the EMA is one fused in-place update; the draws reach
the device by non-blocking copies.

Every random draw of a step is made for the GLOBAL batch from CPU generators and each process takes its slice, so
results do not depend on the process count. A resumed run trains exactly as the uninterrupted one: schedule stages
are re-applied (settings are a function of the step) and draws not yet trained on are made again.
Details: docs/internals.md#tread_benchtrainingtrainerpy
"""
from __future__ import annotations

import json
import math
import multiprocessing
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from accelerate import Accelerator
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from backbones.protocol import weight_decay_groups
from tread_bench.core.devices import to_device
from tread_bench.core.errors import ConfigError
from tread_bench.core.io import atomic_write_text
from tread_bench.data.latents import BatchRows, BatchSampler, whole_batch

from .checkpoint import CHECKPOINT_DIR, find_checkpoint, load_checkpoint, plain_json, save_checkpoint
from .precision import compile_blocks_on, mixed_precision_name, resolve_precision, set_tf32


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf: the run stops and is reported as failed."""


@dataclass
class TrainConfig:
    steps: int = 1000
    global_batch: int = 256
    lr: float = 1e-4
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    label_dropout: float = 0.1
    precision: str = "auto"          # auto = bf16 on CUDA, fp32 on CPU
    tf32: bool = True                # CUDA: TF32 matmuls for what runs in fp32 (tread_bench/training/precision.py)
    route_aware_loss: bool = False   # paper v1 auxiliary loss; off as in v2/v3 and the official code
    fp32_after_route: bool = True
    grad_clip: Optional[float] = None
    checkpoint_every: int = 0        # 0 = only at the end
    log_every: int = 10
    warmup_steps_excluded: int = 5   # steps not counted in samples/s
    compile: bool = False            # torch.compile the whole denoiser
    compile_blocks: Any = "auto"     # torch.compile each block (fuses the element-wise ops around it, as the
                                     # official code does), token count dynamic; auto: on CUDA only
    fault_nan_at_step: Optional[int] = None  # fault injection for tests: the loss turns NaN at this step
    loader_workers: int = 2          # DataLoader processes reading out-of-core latents (0: read in the training
                                     # process); in-memory sets are indexed directly. Results do not depend on it.
    seed: int = 0


def build_accelerator(precision: str, device: str) -> Accelerator:
    """The Accelerator a run on ``device`` ("cpu" or "cuda") trains with, at its resolved ``precision``."""
    resolved = resolve_precision(precision, device)
    return Accelerator(mixed_precision=mixed_precision_name(resolved), cpu=torch.device(device).type != "cuda")


class Trainer:
    """Trains one model (``objective.wrap(method network)``) on one ImageSet; ``run_dir`` holds its checkpoint
    and stats. ``objective`` defaults to EDM. ``schedule``: the method's stages (methods.parse_schedule's
    input: ``[{step, <settings>}, ...]``, or Stages), applied as training reaches them."""

    def __init__(self, denoiser, data, cfg: TrainConfig, run_dir: str | Path,
                 accelerator: Optional[Accelerator] = None, config_snapshot: Optional[dict] = None,
                 objective=None, schedule=None):
        if objective is None:
            from diffusion import build_objective

            objective = build_objective("edm")
        self.objective = objective
        self.cfg, self.data, self.run_dir = cfg, data, Path(run_dir)
        self.config_snapshot = config_snapshot or {}
        if accelerator is None:
            accelerator = build_accelerator(cfg.precision, "cuda" if torch.cuda.is_available() else "cpu")
        self.acc = accelerator
        world = self.acc.num_processes
        if cfg.global_batch % world:
            raise ConfigError(f"global batch {cfg.global_batch} is not divisible by {world} processes; "
                              f"use a multiple of {world}")
        self.local_batch = cfg.global_batch // world
        denoiser.net.set_shard(self.acc.process_index, world)
        cuda = self.acc.device.type == "cuda"
        self.tf32 = set_tf32(cfg.tf32, self.acc.device)
        denoiser.to(self.acc.device)  # before the optimizer: fused AdamW wants its parameters on the device
        self.ema = AveragedModel(denoiser, use_buffers=True)  # the container (checkpoint keys); updated by update_ema
        self.ema.requires_grad_(False)
        self.raw = denoiser
        opt = torch.optim.AdamW(weight_decay_groups(denoiser, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                                weight_decay=cfg.weight_decay, fused=cuda or None)  # params flagged no_weight_decay: none
        self.compiled_blocks = compile_blocks_on(cfg.compile_blocks, self.acc.device)
        if self.compiled_blocks:
            for block in denoiser.net.blocks:
                block.compile(dynamic=True)  # routed and full token counts share one graph
        model = torch.compile(denoiser) if cfg.compile else denoiser
        self.model, self.opt = self.acc.prepare(model, opt)
        self.ema.to(self.acc.device)
        self.data_gen = torch.Generator().manual_seed(cfg.seed)
        self.step, self.images_seen, self.elapsed = 0, 0, 0.0
        self.stats: list[dict] = []
        self.evals: list[dict] = []  # rows appended by the evaluation callback; saved with the checkpoint
        self.window: list[float] = []  # losses since the last log line (saved: resume logs the same values)
        self.unread: list[torch.Tensor] = []  # the device losses of steps not yet read into the window
        self._loader = None             # iterator over batches read by DataLoader workers (out-of-core data)
        self._queued: deque = deque()   # (generator state before, draws) of steps the loader asked for
        self.tracker = None  # live tracking (tread_bench/engine/tracking.py): an object with log(values, step), or None
        from tread_bench.methods import Stage, parse_schedule

        self.stages = (list(schedule) if schedule and all(isinstance(s, Stage) for s in schedule)
                       else parse_schedule(schedule, "schedule"))
        self.stages_begun = 0  # stages applied to the network so far (the settings are a function of the step)

    # -- state -------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        """The checkpoint folder (tread_bench/training/checkpoint.py: model/ema safetensors, state.pt, manifest)."""
        return self.run_dir / CHECKPOINT_DIR

    def state_dict(self) -> dict:
        """Everything but the weights, as plain types (torch.load(weights_only=True) reads it back)."""
        # draws the loader made ahead of training are made again after a resume: save the state before them
        data_state = self._queued[0][0] if self._queued else self.data_gen.get_state()
        return {
            "optimizer": self.opt.state_dict(),
            "step": self.step, "images_seen": self.images_seen, "elapsed": float(self.elapsed),
            "rng": {"data": data_state, "routing": self.raw.net.rng_state(), "torch": torch.get_rng_state()},
            "stats": plain_json(self.stats), "evals": plain_json(self.evals), "window": plain_json(self.window),
            "config": json.dumps(self.config_snapshot, sort_keys=True, default=str),
        }

    def save(self) -> None:
        self.read_losses()  # a diverged run is never checkpointed
        if self.acc.is_main_process:
            save_checkpoint(self.checkpoint_path, self.acc.unwrap_model(self.model), self.ema, self.state_dict())
        self.acc.wait_for_everyone()

    def try_resume(self) -> bool:
        """Resume from the run folder's checkpoint if there is one. A checkpoint that cannot be read raises
        tread_bench.core.errors.CheckpointError (one line: the file and the fix)."""
        path = find_checkpoint(self.run_dir)
        if path is None:
            return False
        state = load_checkpoint(path, self.acc.unwrap_model(self.model), self.ema)
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.images_seen, self.elapsed = state["step"], state["images_seen"], state["elapsed"]
        self._close_loader()
        self.data_gen.set_state(state["rng"]["data"])
        self.raw.net.set_rng_state(state["rng"]["routing"])
        torch.set_rng_state(state["rng"]["torch"])
        self.stats, self.evals, self.window = state["stats"], state.get("evals", []), state.get("window", [])
        self.unread = []
        if self.acc.is_main_process:  # drop lines logged after the checkpoint by the interrupted run
            atomic_write_text(self.run_dir / "stats.jsonl", "".join(json.dumps(r) + "\n" for r in self.stats))
        self.begin_stages()  # a resume past a stage's first step: the settings the uninterrupted run has now
        return True

    def begin_stages(self) -> None:
        """Apply (Method.apply_settings) every stage of the schedule that has begun by ``self.step`` and is not
        applied yet; called before each step and after a resume."""
        from tread_bench.methods import apply_stages, stage_index

        reached = stage_index(self.stages, self.step)
        if reached <= self.stages_begun:
            return
        for i in range(self.stages_begun, reached):
            if self.acc.is_main_process:
                settings = ", ".join(f"{k}={v}" for k, v in self.stages[i].settings.items())
                tqdm.write(f"[{self.run_dir.name}] stage {i + 1} of {len(self.stages)} from step "
                           f"{self.stages[i].step}: {settings}")
        self.stages_begun = apply_stages(self.raw.net, self.stages, self.stages_begun, reached)

    # -- one step ----------------------------------------------------------------------------
    def _draw(self):
        """One step's global-batch draws from the data generator: (this process's image indices, labels,
        objective draws), the labels and draws already sliced to this process."""
        n, gb, cfg = len(self.data), self.cfg.global_batch, self.cfg
        idx = torch.randint(n, (gb,), generator=self.data_gen)
        drop = torch.rand(gb, generator=self.data_gen) < cfg.label_dropout
        draws = self.objective.draw(gb, self.data.shape, self.data_gen)  # e.g. noise levels and noise
        lo, hi = self.acc.process_index * self.local_batch, (self.acc.process_index + 1) * self.local_batch
        y = torch.where(drop, self.data.num_classes, self.data.labels[idx])[lo:hi]
        return idx[lo:hi], y, {k: v[lo:hi] for k, v in draws.items()}

    def _draw_batch(self):
        """Global-batch draws from the data generator, sliced to this process, and the images they pick."""
        if isinstance(self.data.images, torch.Tensor) or self._workers() == 0:
            idx, y, draws = self._draw()
            x = self.data.images[idx]
        else:
            x = next(self._loader_iter())
            _, (idx, y, draws) = self._queued.popleft()
        dev = self.acc.device
        return to_device(x, dev).float(), to_device(y, dev), {k: to_device(v, dev) for k, v in draws.items()}

    def _workers(self) -> int:
        if multiprocessing.current_process().daemon:
            return 0  # a daemonic process (a pool worker) cannot start DataLoader workers
        return max(0, int(self.cfg.loader_workers))

    def _step_indices(self):
        """The DataLoader's batch sampler (runs in this process, in step order): draws a step, queues its
        draws with the generator state before them, hands the image indices to a worker."""
        while True:
            before = self.data_gen.get_state()
            drawn = self._draw()
            self._queued.append((before, drawn))
            yield drawn[0].tolist()

    def _loader_iter(self):
        if self._loader is None:
            from torch.utils.data import DataLoader

            loader = DataLoader(BatchRows(self.data.images), batch_sampler=BatchSampler(self._step_indices),
                                num_workers=self._workers(), collate_fn=whole_batch, prefetch_factor=2,
                                pin_memory=self.acc.device.type == "cuda",
                                generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
            self._loader = iter(loader)
        return self._loader

    def _close_loader(self) -> None:
        """Stop the workers; draws queued for steps not trained are undone (the generator goes back)."""
        if self._queued:
            self.data_gen.set_state(self._queued[0][0])
        self._queued.clear()
        self._loader = None  # the iterator's workers stop when it is collected

    def train_step(self) -> torch.Tensor:
        """One optimizer step; returns this process's loss as a device tensor (reading it would sync)."""
        x, y, draws = self._draw_batch()
        self.model.train()
        with self.acc.autocast():
            loss = self.objective.loss(self.model, x, y, draws, route_aware=self.cfg.route_aware_loss).mean()
        self.opt.zero_grad(set_to_none=True)
        self.acc.backward(loss)
        if self.cfg.grad_clip:
            self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.update_ema()
        value = loss.detach().float()
        if self.cfg.fault_nan_at_step == self.step + 1:
            value = value * float("nan")
        self.step += 1
        self.images_seen += self.cfg.global_batch
        return value

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema <- decay * ema + (1 - decay) * model over parameters and buffers, as one fused in-place lerp (the
        arithmetic of torch.optim.swa_utils.get_ema_multi_avg_fn, whose AveragedModel.update_parameters would sync
        the host twice); the first update copies."""
        ema = [t.detach() for t in (*self.ema.module.parameters(), *self.ema.module.buffers())]
        model = self.acc.unwrap_model(self.model)
        current = [t.detach() for t in (*model.parameters(), *model.buffers())]
        if self.step == 0:
            torch._foreach_copy_(ema, current)
        else:
            floating = [i for i, t in enumerate(ema) if t.is_floating_point() or t.is_complex()]
            torch._foreach_lerp_([ema[i] for i in floating], [current[i] for i in floating], 1 - self.cfg.ema_decay)
            for i in set(range(len(ema))) - set(floating):
                ema[i].copy_(ema[i] * self.cfg.ema_decay + current[i] * (1 - self.cfg.ema_decay))
        self.ema.n_averaged.add_(1)

    def read_losses(self) -> None:
        """Read the losses of the steps since the last read into the window: one host sync for all of them. The
        global mean over processes (identical whatever their number); a non-finite one fails the run at its step."""
        if not self.unread:
            return
        values = self.acc.reduce(torch.stack(self.unread), reduction="mean").tolist()
        first = self.step - len(values) + 1
        self.unread = []
        for i, value in enumerate(values):
            if not math.isfinite(value):
                raise TrainingDiverged(f"loss became {value} at step {first + i}; lower lr, enable grad_clip, "
                                       "or keep fp32_after_route on")
        self.window.extend(values)

    # -- the loop ----------------------------------------------------------------------------
    def train(self, on_eval: Optional[Callable[["Trainer"], None]] = None, eval_every: int = 0,
              eval_at: Sequence[int] = ()) -> dict:
        """Train to cfg.steps, calling ``on_eval`` every ``eval_every`` steps, at the steps ``eval_at`` and at the
        final step."""
        cfg = self.cfg
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.run_dir.name, disable=not self.acc.is_main_process,
                   dynamic_ncols=True, leave=False)
        try:
            measured_steps, measured_time = self._train_loop(bar, on_eval, eval_every, frozenset(eval_at))
        finally:
            self._close_loader()
        bar.close()
        self.read_losses()
        if on_eval and not any(e.get("step") == self.step for e in self.evals):
            on_eval(self)  # the final evaluation, once, also after a resume
        self.save()
        tail = [s["loss"] for s in self.stats[-3:]]
        return {
            "steps": self.step, "images_seen": self.images_seen, "wall_time_s": self.elapsed,
            "final_loss": sum(tail) / max(len(tail), 1),
            "samples_per_s": (measured_steps * cfg.global_batch / measured_time) if measured_time else float("nan"),
        }

    def _train_loop(self, bar, on_eval, eval_every, eval_at) -> tuple[int, float]:
        """Train to cfg.steps; returns (steps, seconds) counted for samples/s (warm-up steps excluded)."""
        cfg = self.cfg
        measured_time, measured_steps = 0.0, 0
        mark = (self.step, self.elapsed)  # the previous log line: samples/s over the steps since
        while self.step < cfg.steps:
            self.begin_stages()  # off the clock: a stage's first step (a no-op between boundaries)
            t0 = time.perf_counter()
            self.unread.append(self.train_step())
            logging = self.step % cfg.log_every == 0 or self.step == cfg.steps
            evaluating = bool(on_eval and ((eval_every and self.step % eval_every == 0) or self.step in eval_at))
            saving = bool(cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0)
            if logging or evaluating or saving:
                self.read_losses()  # the loop's one sync: on the clock, so wall time includes the device's work
            dt = time.perf_counter() - t0
            self.elapsed += dt
            if self.step > cfg.warmup_steps_excluded:
                measured_time, measured_steps = measured_time + dt, measured_steps + 1
            bar.update(1)
            if logging:
                record = {"step": self.step, "kimg": self.images_seen / 1000, "loss": sum(self.window) / len(self.window),
                          "wall_s": round(self.elapsed, 4)}
                self.stats.append(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                self._append_stats(record)
                self.window = []
                if self.tracker is not None:
                    seconds = self.elapsed - mark[1]
                    self.tracker.log({"train/loss": record["loss"], "train/lr": self.opt.param_groups[0]["lr"],
                                      "train/samples_per_s": (self.step - mark[0]) * cfg.global_batch / seconds
                                      if seconds > 0 else float("nan")}, step=self.step)
                mark = (self.step, self.elapsed)
            if evaluating and self.step < cfg.steps:
                on_eval(self)
            if saving and self.step < cfg.steps:
                self.save()
        return measured_steps, measured_time

    def _append_stats(self, record: dict) -> None:
        if self.acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "stats.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    @property
    def ema_denoiser(self):
        return self.ema.module
