"""The shared training loop: Accelerate, mixed precision, accumulation, clipping, EMA, exact resume, logging."""

from avatar_core.train.checkpoint import latest_checkpoint, list_checkpoints
from avatar_core.train.ema import EMA
from avatar_core.train.loop import RESUME_KEYS, TrainConfig, Trainer

__all__ = ["EMA", "RESUME_KEYS", "TrainConfig", "Trainer", "latest_checkpoint", "list_checkpoints"]
