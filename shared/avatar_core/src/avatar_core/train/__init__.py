"""The shared training loop: Accelerate, mixed precision, accumulation, clipping, EMA, exact resume, logging,
one run per folder (run lock), ``--restart`` (old run moved aside), seeded construction, resume signatures."""

from avatar_core.train.checkpoint import latest_checkpoint, list_checkpoints
from avatar_core.train.ema import EMA
from avatar_core.train.lock import RunLockedError, move_aside, run_lock
from avatar_core.train.loop import RESUME_KEYS, TrainConfig, Trainer
from avatar_core.train.seeding import seeded
from avatar_core.train.sharding import global_batches, process_shard, shard_batch
from avatar_core.train.signature import TRAIN_MAY_CHANGE, config_signature, signature_diff

__all__ = ["EMA", "RESUME_KEYS", "TRAIN_MAY_CHANGE", "RunLockedError", "TrainConfig", "Trainer", "config_signature",
           "latest_checkpoint", "list_checkpoints", "move_aside", "run_lock", "seeded", "signature_diff",
           "global_batches", "process_shard", "shard_batch"]
