"""The one training loop every method package reuses (Accelerate: single CPU/GPU or ``accelerate launch``).

Units: a *step* is one optimizer update made of ``gradient_accumulation_steps`` micro-batches;
``max_steps``, ``checkpoint_every``, ``log_every`` and the LR scheduler all count steps, whatever
the number of processes.

Exact resume. A checkpoint stores model, optimizer, scheduler, EMA, GradScaler, every process's
RNG states, the step and the data position (epoch, micro-batches consumed in it). The data order
is a pure function of ``(seed, epoch)``: a shuffling ``DataLoader`` is prepared with Accelerate's
seedable sampler re-seeded with ``seed + epoch`` every epoch, and a callable ``data(epoch)`` must
return the same batches for the same epoch. On resume the consumed batches of the current epoch
are skipped. Batches are fetched under a forked torch RNG, so loading data never shifts the
random stream the model draws from (dropout, noise, timesteps); randomness inside a dataset
should therefore come from the sampler or from per-sample seeds, not from the global RNG.

Reproducibility. A model given as a factory (``model=lambda: build(cfg)``) is built under
:func:`~avatar_core.train.seeding.seeded` with ``seed``, so its initial weights are a function of the seed
alone and two runs of one config write bit-identical checkpoints.

One run per folder. :meth:`Trainer.train` holds the folder's run lock (:mod:`avatar_core.train.lock`) while
it runs; a second run into the same folder is refused with a one-line error. A fresh run (``resume=None``,
the CLIs' ``--restart``) into a folder that holds an earlier run moves that run aside to
``<output_dir>.old-<UTC time>`` first, so no checkpoint of it can be resumed into the new one.

Resume signature. The loop settings are compared on resume except those of
:data:`~avatar_core.train.signature.TRAIN_MAY_CHANGE`; ``run_config`` is compared whole, so packages pass
``config_signature(cfg, allow=...)`` (:mod:`avatar_core.train.signature`): every setting except an
explicit allow-list.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, send_to_device, set_seed
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from avatar_core.errors import AvatarError, ConfigError, CorruptFileError, InputError, MissingFileError
from avatar_core.io.tensors import atomic_write, load_json, load_tensors, save_json, save_tensors
from avatar_core.train import checkpoint as ckpt
from avatar_core.train import lock as run_lock
from avatar_core.train.ema import EMA
from avatar_core.train.seeding import seeded
from avatar_core.train.signature import TRAIN_MAY_CHANGE, flatten, signature_diff

log = logging.getLogger(__name__)

#: TrainConfig fields that must match between a checkpoint and the run resuming it (all but TRAIN_MAY_CHANGE).
RESUME_KEYS = ("seed", "mixed_precision", "gradient_accumulation_steps", "max_grad_norm", "ema_decay")

StepFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict[str, Any]]"]


@dataclass
class TrainConfig:
    """Settings of the training loop (the optimizer, learning rate and model are the caller's)."""

    output_dir: str = "outputs/run"
    """Checkpoints go to ``<output_dir>/checkpoints``, metrics to ``<output_dir>/metrics.jsonl``."""
    max_steps: int = 1000
    """Optimizer steps to train for (counting those of resumed runs)."""
    seed: int = 0
    """Seeds python, numpy and torch (offset by process rank) and the data order."""
    mixed_precision: str = "no"
    """"no", "fp16" or "bf16" (Accelerate autocast; fp16 adds a GradScaler)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; None turns clipping off."""
    ema_decay: float | None = None
    """Decay of the parameter EMA; None turns EMA off."""
    checkpoint_every: int = 1000
    """Save a checkpoint every this many steps (and always after the last step)."""
    keep_last_checkpoints: int | None = 3
    """Delete older checkpoints beyond this many; None keeps all."""
    log_every: int = 10
    """Append a metrics line every this many steps."""
    progress_bar: bool = True
    """Show a tqdm bar (main process, interactive terminal only)."""
    allow_config_change: bool = False
    """Resume even when the settings differ from the checkpoint's (a warning lists the differences)."""


def _validate(cfg: TrainConfig) -> None:
    problems = []
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        problems.append(f"mixed_precision={cfg.mixed_precision!r} (use 'no', 'fp16' or 'bf16')")
    for key in ("max_steps", "gradient_accumulation_steps", "checkpoint_every", "log_every"):
        if getattr(cfg, key) < 1 and not (key == "max_steps" and cfg.max_steps == 0):
            problems.append(f"{key}={getattr(cfg, key)} (must be >= 1)")
    if cfg.max_grad_norm is not None and not cfg.max_grad_norm > 0:
        problems.append(f"max_grad_norm={cfg.max_grad_norm} (must be > 0, or None for no clipping)")
    if cfg.keep_last_checkpoints is not None and cfg.keep_last_checkpoints < 1:
        problems.append(f"keep_last_checkpoints={cfg.keep_last_checkpoints} (must be >= 1, or None to keep all)")
    if problems:
        raise ConfigError("invalid TrainConfig: " + "; ".join(problems), "fix these train.* values")


class Trainer:
    """Train ``model`` by ``step_fn(model, batch) -> (loss, metrics)`` over ``data``; see the module docstring.

    Args:
        config: loop settings.
        model: the module to train (Accelerate wraps it; ``unwrapped_model`` is the original), or a
            factory ``() -> module`` that is called under ``seeded(config.seed)`` (reproducible weights).
        optimizer: an optimizer over ``model``'s parameters, or a factory ``params -> optimizer``.
        step_fn: computes the loss of one micro-batch; runs under autocast when mixed precision is on.
        data: a ``DataLoader`` (sharded across processes), a callable ``epoch -> iterable of batches``,
            or a re-iterable (e.g. a list) read in the same order every epoch.
        lr_scheduler: a scheduler over ``optimizer``, or a factory ``optimizer -> scheduler``;
            stepped once per optimizer step.
        run_config: the caller's own settings (JSON-serialisable); stored in checkpoints and
            compared on resume like the RESUME_KEYS of ``config``; build it with
            :func:`avatar_core.train.signature.config_signature`.
        config_key: where ``config`` sits in the user's config (e.g. ``"diffusion.train"``), so that
            the refusal of a changed config names an override the CLI accepts.
        run_defaults: ``run_config`` of the schema's defaults (same allow-list); a key a checkpoint lacks
            (added to the config later) that holds its default is then not a difference.
    """

    def __init__(self, config: TrainConfig | dict, model: nn.Module | Callable[[], nn.Module],
                 optimizer: torch.optim.Optimizer | Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
                 step_fn: StepFn, data: DataLoader | Callable[[int], Iterable] | Iterable,
                 lr_scheduler: Any | Callable[[torch.optim.Optimizer], Any] | None = None,
                 run_config: dict | None = None, config_key: str = "train", run_defaults: dict | None = None):
        if isinstance(config, DictConfig):
            config = OmegaConf.to_object(config)  # a structured node gives a TrainConfig, a plain one a dict
        if isinstance(config, dict):
            unknown = sorted(set(config) - {f.name for f in dataclasses.fields(TrainConfig)})
            if unknown:
                raise ConfigError(f"unknown TrainConfig keys: {unknown}",
                                  f"valid keys are {[f.name for f in dataclasses.fields(TrainConfig)]}")
            config = TrainConfig(**config)
        _validate(config)
        self.config = config
        self.config_key = config_key
        self.run_defaults = json.loads(json.dumps(run_defaults or {}))
        self.step_fn = step_fn
        self.run_config = json.loads(json.dumps(run_config or {}))  # a JSON-clean copy, or a clear TypeError now
        self.output_dir = Path(config.output_dir)
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=config.gradient_accumulation_steps, sync_with_dataloader=False),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
            step_scheduler_with_optimizer=False,
        )
        if not isinstance(model, nn.Module):
            with seeded(config.seed):  # before set_seed: the weights do not depend on the process rank
                model = model()
            if not isinstance(model, nn.Module):
                raise InputError(f"Trainer: the model factory returned {type(model).__name__}, not an nn.Module")
        set_seed(config.seed, device_specific=True)

        if not isinstance(optimizer, torch.optim.Optimizer):
            optimizer = optimizer(model.parameters())
        if lr_scheduler is not None and not hasattr(lr_scheduler, "state_dict"):
            lr_scheduler = lr_scheduler(optimizer)
        self.lr_scheduler = lr_scheduler

        if isinstance(data, DataLoader):
            self.model, self.optimizer, self.data = self.accelerator.prepare(model, optimizer, data)
        else:
            if not callable(data) and iter(data) is data:
                raise InputError("Trainer: `data` is a one-shot iterator, which cannot be replayed on resume",
                                 "pass a DataLoader, a list, or a function epoch -> iterable of batches")
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
            self.data = data
        self.unwrapped_model = self.accelerator.unwrap_model(self.model)
        self.ema = EMA(self.unwrapped_model, config.ema_decay) if config.ema_decay is not None else None

        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches of `epoch` already consumed
        self.last_log: dict[str, Any] = {}

    # ------------------------------------------------------------------ data
    def _epoch_batches(self, epoch: int, skip: int) -> Iterable:
        if isinstance(self.data, DataLoader):
            self.data.set_epoch(epoch)  # seedable sampler: order = f(seed + epoch)
            return self.accelerator.skip_first_batches(self.data, skip) if skip else self.data
        batches_from = getattr(self.data, "batches_from", None)
        if batches_from is not None:  # a streaming loader (avatar_core.data.stream) skips by index, reading nothing
            return (send_to_device(b, self.accelerator.device) for b in batches_from(epoch, skip))
        batches = self.data(epoch) if callable(self.data) else self.data
        return (send_to_device(b, self.accelerator.device) for b in itertools.islice(batches, skip, None))

    def _batches(self) -> Iterator[Any]:
        """Micro-batches from the current data position on, forever; advances ``epoch``/``batch_in_epoch``."""
        end = object()
        while True:
            with torch.random.fork_rng(devices=[]):  # iterator creation draws from the global RNG
                it = iter(self._epoch_batches(self.epoch, self.batch_in_epoch))
            got_any = False
            while True:
                with torch.random.fork_rng(devices=[]):
                    batch = next(it, end)
                if batch is end:
                    break
                got_any = True
                self.batch_in_epoch += 1
                yield batch
            if not got_any and self.batch_in_epoch == 0:
                raise InputError("Trainer: the data produced no batches", "check the dataset is not empty "
                                 "and that batch_size <= dataset size when drop_last=True")
            self.epoch += 1
            self.batch_in_epoch = 0

    # ------------------------------------------------------------------ loop
    def train(self, resume: str | os.PathLike | None = None, allow_config_change: bool = False) -> dict[str, Any]:
        """Run until ``max_steps``; ``resume`` is None (fresh), "auto" (latest checkpoint, if any) or a path.

        Returns the last metrics record. A fresh run into a folder that holds an earlier run (checkpoints
        or a metrics log) first moves that run aside to ``<output_dir>.old-<UTC time>``. The folder's run
        lock is held until this returns; a second run into it raises :class:`~avatar_core.train.lock.RunLockedError`.
        ``allow_config_change`` (or ``config.allow_config_change``) resumes even when the settings differ
        from the checkpoint's (logged as a warning).
        """
        main = self.accelerator.is_main_process
        if main:
            run_lock.acquire(self.output_dir)
        try:
            return self._train(resume, allow_config_change or self.config.allow_config_change)
        finally:
            if main:
                run_lock.release(self.output_dir)

    def _train(self, resume: str | os.PathLike | None, allow_config_change: bool) -> dict[str, Any]:
        cfg, acc = self.config, self.accelerator
        # Accelerate keeps accumulation settings in process-wide state; another Trainer may have changed them.
        acc.gradient_accumulation_steps = cfg.gradient_accumulation_steps
        if acc.is_main_process:
            if resume is None and ckpt.holds_run(self.output_dir):
                old = run_lock.move_aside(self.output_dir)
                log.warning("%s held an earlier run, now kept in %s; this run starts from scratch",
                            self.output_dir, old)
            ckpt.remove_stale(self.output_dir)
        acc.wait_for_everyone()
        if resume is not None:
            path = ckpt.latest_checkpoint(self.output_dir) if str(resume) == "auto" else Path(resume)
            if path is None:
                log.info("no checkpoint in %s; training from scratch", self.output_dir / ckpt.CHECKPOINTS)
            else:
                self.load_checkpoint(path, allow_config_change=allow_config_change)
        if acc.is_main_process:
            self._truncate_metrics()  # a fresh run starts an empty log; a resumed one drops lines past its step

        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=True if not (acc.is_main_process and cfg.progress_bar) else None)
        batches = self._batches()
        k = cfg.gradient_accumulation_steps
        self.model.train()
        while self.step < cfg.max_steps:
            losses, metrics_list, grad_norm = [], [], None
            for _ in range(k):
                batch = next(batches)
                with acc.accumulate(self.model):
                    with acc.autocast():
                        loss, metrics = self.step_fn(self.model, batch)
                    acc.backward(loss)  # divides by k
                    if acc.sync_gradients and cfg.max_grad_norm is not None:
                        grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                    self.optimizer.step()  # a no-op until the k-th micro-batch
                    self.optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach().float())
                metrics_list.append(metrics or {})
            if not acc.optimizer_step_was_skipped:  # fp16 overflow: nothing moved
                if self.lr_scheduler is not None:
                    self.lr_scheduler.step()
                if self.ema is not None:
                    self.ema.update(self.unwrapped_model)
            self.step += 1
            bar.update(1)

            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                self._log(losses, metrics_list, grad_norm, bar)
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                self.save_checkpoint()
        bar.close()
        acc.wait_for_everyone()
        return self.last_log

    def _log(self, losses: list[torch.Tensor], metrics_list: list[dict], grad_norm: Any, bar: tqdm) -> None:
        """Average the step's micro-batches, gather across processes, append one JSONL line (main process)."""
        acc = self.accelerator
        keys = sorted(metrics_list[0])
        values = [torch.stack(losses).mean()]
        values += [torch.stack([torch.as_tensor(m[key], dtype=torch.float32).mean().cpu() for m in metrics_list]).mean()
                   for key in keys]
        if grad_norm is not None:
            keys.append("grad_norm")
            values.append(torch.as_tensor(grad_norm, dtype=torch.float32).cpu())
        local = torch.stack([v.to(acc.device, torch.float32) for v in values])  # [1 + M]
        means = acc.gather(local[None]).mean(0).tolist()  # every process calls gather; only main writes
        lr = self.optimizer.param_groups[0]["lr"]
        record = {"step": self.step, "epoch": self.epoch, "loss": means[0], "lr": lr,
                  "metrics": dict(zip(keys, means[1:])), "time": time.time()}
        self.last_log = record
        if acc.is_main_process:
            with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{means[0]:.4g}", lr=f"{lr:.3g}")

    # ------------------------------------------------------------------ checkpoints
    def _signature(self) -> dict[str, Any]:
        """The settings a resumed run must share with its checkpoint, as flat dotted keys."""
        loop = dataclasses.asdict(self.config)
        sig = {f"train.{k}": v for k, v in flatten(loop).items() if k not in TRAIN_MAY_CHANGE}
        sig["num_processes"] = self.accelerator.num_processes
        sig.update(flatten(self.run_config, "run"))
        return sig

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current state atomically (all processes must call this)."""
        acc = self.accelerator
        final = ckpt.checkpoint_dir(self.output_dir, self.step)
        tmp = final.with_name(f".tmp-{final.name}")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        ckpt.save_rng(tmp / f"rng_{acc.process_index}.safetensors")
        acc.wait_for_everyone()
        if acc.is_main_process:
            meta = {"step": self.step}
            save_tensors(tmp / "model.safetensors", self.unwrapped_model.state_dict(), meta)
            if self.ema is not None:
                save_tensors(tmp / "ema.safetensors", self.ema.state_dict(), {**meta, "num_updates": self.ema.num_updates})
            self._torch_save(tmp / "optimizer.pt", self.optimizer.state_dict())
            if self.lr_scheduler is not None:
                self._torch_save(tmp / "scheduler.pt", self.lr_scheduler.state_dict())
            if acc.scaler is not None:
                self._torch_save(tmp / "scaler.pt", acc.scaler.state_dict())
            state = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                     "signature": self._signature(), "config": dataclasses.asdict(self.config),
                     "run_config": self.run_config, "time": time.time()}
            save_json(tmp / ckpt.STATE_FILE, state)  # last: its presence marks the checkpoint complete
            ckpt.publish(tmp, final)
            keep = self.config.keep_last_checkpoints
            if keep is not None:
                for old in ckpt.list_checkpoints(self.output_dir)[:-keep]:
                    shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    @staticmethod
    def _torch_save(path: Path, obj: Any) -> None:
        # Serialised in memory: torch.save names the zip records after the file it writes, and the atomic write's
        # temporary name is random, so writing to it directly would make identical states differ in bytes.
        buf = io.BytesIO()
        torch.save(obj, buf)
        with atomic_write(path) as tmp:
            tmp.write_bytes(buf.getvalue())

    def load_checkpoint(self, path: str | os.PathLike, allow_config_change: bool = False) -> None:
        """Restore everything :meth:`save_checkpoint` wrote, including this process's RNG states."""
        acc, path = self.accelerator, Path(path)
        if not (path / ckpt.STATE_FILE).is_file():
            raise MissingFileError(f"no complete checkpoint at {path} (missing {ckpt.STATE_FILE})",
                                   f"pick one of {[str(p) for p in ckpt.list_checkpoints(self.output_dir)] or 'none'}"
                                   " or pass resume='auto'")
        files = {"model": path / "model.safetensors", "optimizer": path / "optimizer.pt"}
        try:
            state = load_json(path / ckpt.STATE_FILE)
            self._check_signature(state["signature"], path, allow_config_change)
            model_sd, _ = load_tensors(files["model"])
            ema_sd, ema_meta = load_tensors(path / "ema.safetensors") if self.ema is not None else (None, {})
            opt_sd = self._torch_load(files["optimizer"])
            sched_sd = self._torch_load(path / "scheduler.pt") if self.lr_scheduler is not None else None
            scaler_sd = self._torch_load(path / "scaler.pt") if acc.scaler is not None else None
            rng_file = path / f"rng_{acc.process_index}.safetensors"
            rng = ckpt.load_rng(rng_file) if rng_file.is_file() or not allow_config_change else None
        except ConfigError:
            raise
        except (AvatarError, KeyError, TypeError, OSError, RuntimeError, EOFError, ValueError) as e:
            earlier = [p for p in ckpt.list_checkpoints(path.parent.parent) if p.name < path.name]
            hint = (f"delete {path} and resume from the earlier checkpoint {earlier[-1]}" if earlier
                    else f"delete {path}; no earlier checkpoint exists, so training restarts from scratch")
            reason = e.message if isinstance(e, AvatarError) else f"{type(e).__name__}: {e}"
            raise CorruptFileError(f"checkpoint {path} is corrupt or incomplete: {reason}", hint) from e

        try:
            self.unwrapped_model.load_state_dict(model_sd)
            if self.ema is not None:
                self.ema.load_state_dict(ema_sd, num_updates=ema_meta.get("num_updates", 0))
            self.optimizer.load_state_dict(opt_sd)
        except RuntimeError as e:
            raise ConfigError(f"checkpoint {path} does not fit the current model/optimizer: {e}",
                              "resume with the model and optimizer it was trained with, or start a new output_dir") from e
        if sched_sd is not None:
            self.lr_scheduler.load_state_dict(sched_sd)
        if scaler_sd is not None:
            acc.scaler.load_state_dict(scaler_sd)
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        if rng is not None:
            ckpt.restore_rng(rng)
        else:
            log.warning("no RNG state for process %d in %s; random streams restart from the seed",
                        acc.process_index, path)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch, self.batch_in_epoch)

    @staticmethod
    def _torch_load(path: Path) -> Any:
        if not path.is_file():
            raise MissingFileError(f"{path.name} is missing from the checkpoint")
        return torch.load(path, map_location="cpu", weights_only=True)

    def _check_signature(self, stored: dict[str, Any], path: Path, allow: bool) -> None:
        defaults = {f"train.{k}": v for k, v in flatten(dataclasses.asdict(TrainConfig())).items()}
        defaults.update(flatten(self.run_defaults, "run"))
        diff = signature_diff(stored, self._signature(), defaults)
        if not diff:
            return
        msg = f"the run's settings differ from checkpoint {path}: " + "; ".join(diff)
        if allow:
            log.warning("%s (resuming anyway: allow_config_change)", msg)
            return
        raise ConfigError(msg, f"restore those settings; or start a new run with --restart (the old one is kept "
                               f"as {self.output_dir}.old-<time>); or, if the change is intended, resume anyway "
                               f"with {self.config_key}.allow_config_change=true")

    def _truncate_metrics(self) -> None:
        """Drop metrics lines written after the resumed step (by a run that crashed later)."""
        path = self.output_dir / "metrics.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= self.step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by the crash
        with atomic_write(path) as tmp:
            tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
