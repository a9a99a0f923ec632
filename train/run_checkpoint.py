"""The checkpoint steps of a run (:class:`train.run.Run`): restore from ``last.pt``, save at epoch ends and inside
an epoch (preemption, ``checkpoint.every_steps``), and the ``samples.pt`` debug trace.

``last.pt`` holds the weights, optimizer, GradScaler, schedule, step, bookkeeping, conv1 filters, every rank's RNG
states and loader streams, and, inside an epoch, every rank's position (train/preempt.py); ``best.pt`` the weights
of the best validation top-1. Everything is plain tensors / numbers / lists / dicts (loads with
``weights_only=True``), written atomically by rank 0.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from models.config import ModelConfigError
from models.pretrained import load_weights
from train import checkpoint as ckpt
from train import distributed
from train.config import ConfigError
from train.preempt import EpochPosition


def public_metrics(metrics: dict[str, Any] | None) -> dict[str, float] | None:
    """The ``{"top1", "top5", "loss"}`` of a split's metrics (what summary.json and best.pt keep)."""
    if metrics is None:
        return None
    return {"top1": metrics["top1"], "top5": metrics["top5"], "loss": metrics["loss"]}


class RunCheckpoints:
    """Mixin of :class:`train.run.Run`: it uses the run's parts (net, state, loaders, book, folder, signals)."""

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Continue from ``last.pt``: weights, optimizer, scaler, schedule, step, bookkeeping, RNG streams."""
        state, env = self.state, self.env
        try:
            load_weights(self.net, checkpoint["model"], str(self.folder / "last.pt"))
        except ModelConfigError as error:
            raise ConfigError(f"--resume: {error}") from None
        state.optimizer.load_state_dict(checkpoint["optimizer"])
        if state.scaler is not None and checkpoint.get("scaler"):
            state.scaler.load_state_dict(checkpoint["scaler"])
        state.schedule.load_state_dict(checkpoint["schedule"])
        if self.cuda_graphs:  # the captured step reads the learning rate from a device tensor, whatever was saved
            for group in state.optimizer.param_groups:
                group["lr"] = torch.as_tensor(group["lr"], dtype=torch.float32).to(self.device).clone()
        state.global_step = int(checkpoint["global_step"])
        self.book.update(checkpoint["book"])
        self.conv1 = dict(checkpoint.get("conv1", self.conv1))
        ranks, position = len(checkpoint["rng"]), checkpoint.get("position")
        if position is not None:
            self._check_epoch_layout(checkpoint, position)
        if ranks == env.world_size:  # same number of ranks: continue every stream exactly
            ckpt.set_rng_state(checkpoint["rng"][env.rank])
            self.train_loader.load_state_dict((checkpoint.get("loaders") or [{}] * ranks)[env.rank])
        elif position is not None:  # the batch index and the partial sums are per rank: no exact continuation
            raise ConfigError(
                f"--resume: {self.folder / 'last.pt'} was saved inside epoch {position['epoch'] + 1} by {ranks} "
                f"process(es); resume it with {ranks} (torchrun --nproc_per_node), or wait for an epoch-end checkpoint"
            )
        else:  # another world size: fresh per-rank streams (the loaders' shuffles depend only on seed and epoch)
            ckpt.seed_all(distributed.rank_seed(int(self.config["seed"]), env.rank, self.book["epoch"]))
            self.say(f"resuming {ranks}-rank checkpoint on {env.world_size} rank(s): RNG reseeded per rank")
        where = f"epoch {self.book['epoch']}"
        if position is not None:
            self.boundary.resume = EpochPosition(**position["ranks"][env.rank])
            where = f"epoch {position['epoch'] + 1} batch {position['batch']}/{len(self.train_loader)}"
        self.say(f"resumed {self.folder / 'last.pt'} at {where} (step {state.global_step})")

    def _check_epoch_layout(self, checkpoint: dict[str, Any], position: dict[str, Any]) -> None:
        """A position inside an epoch is a batch index into that epoch's order: a resume that changes what makes
        the batches (their size, the subset, the data set's size) would skip or repeat samples, so it is refused."""
        saved = (checkpoint.get("config") or {}).get("data") or {}
        keys = ("batch_size", "subset", "synthetic_size")
        changed = [f"data.{k}={saved[k]!r} -> {self.config['data'][k]!r}" for k in keys
                   if k in saved and saved[k] != self.config["data"][k]]  # fmt: skip
        if changed:
            raise ConfigError(
                f"--resume: {self.folder / 'last.pt'} was saved inside epoch {position['epoch'] + 1} (batch "
                f"{position['batch']}); resuming with {', '.join(changed)} would skip or repeat samples: resume with "
                "the saved values"
            )

    def save(
        self,
        improved: bool,
        val_metrics: dict[str, Any] | None,
        position: EpochPosition | None = None,
        force_last: bool = False,
        final: bool = False,
        only_unsaved: bool = False,
    ) -> None:
        """The checkpoint after an epoch: last.pt (with every rank's RNG state and loader streams), best.pt on
        improvement, conv1.pt. With a ``position``, last.pt inside an epoch (always written: a preemption or
        ``every_steps``). Rank 0 writes; every rank calls (the RNG states are gathered).

        ``checkpoint.interval_seconds`` (default 30; 0: every epoch): an epoch-end checkpoint is written only when
        that long has passed since the last write, or at ``final`` (the last epoch, an early stop, a stop between
        epochs). In between, an improved model is kept in memory (on the CPU) as the pending best.pt, written
        with the next last.pt, so the two files always agree. ``only_unsaved``: write only if the interval held
        the last epoch's checkpoint back (a stop between epochs). A 0.6 s epoch of AlexNet on a GPU would otherwise
        spend longer writing its 690 MB of checkpoints than training; a signal still saves at once.
        """
        mine = {
            "rng": ckpt.rng_state(),
            "loader": self.train_loader.state_dict(),
            "position": position.as_dict() if position is not None else None,
        }
        ranks = distributed.gather_objects(mine, self.env)  # collective: every rank calls it
        if not self.env.is_main:
            return
        saving = self.config["checkpoint"]
        if improved and saving["save_best"]:
            self.pending_best = {
                "model": ckpt.model_state(self.net),
                "epoch": self.book["epoch"],
                "val": public_metrics(val_metrics),
            }
        if only_unsaved and not self.unsaved_epoch:
            return
        if position is None and not (force_last or final) and not self._checkpoint_due():
            self.unsaved_epoch = True
            return
        self.boundary.signal_in_save()  # test hook: a second signal while this checkpoint is written
        with self.signals.deferred_interrupt():
            self._write(ranks, position, saving["save_last"] or force_last or bool(position))
        self.last_write = time.monotonic()
        self.unsaved_epoch = False

    def _checkpoint_due(self) -> bool:
        interval = float(self.config["checkpoint"]["interval_seconds"])
        return interval <= 0 or self.last_write is None or time.monotonic() - self.last_write >= interval

    def write_pending_best(self) -> None:
        """Write a best.pt that the interval held back (the run ends without another last.pt: a non-finite
        loss); rank 0."""
        if self.pending_best is not None and self.env.is_main:
            ckpt.atomic_save(self.pending_best, self.folder / "best.pt")
            self.pending_best = None

    def save_position(self, position: EpochPosition) -> None:
        """The mid-epoch checkpoint of :class:`train.preempt.StepBoundary` (signal or ``every_steps``)."""
        self.save(False, None, position)
        what = f"preempted ({self.signals.name})" if self.signals.requested else "checkpoint"
        self.say(
            f"{what} at step {self.state.global_step} (epoch {position.epoch + 1}, batch {position.batch}/"
            f"{len(self.train_loader)}): {self.folder / 'last.pt'}"
        )

    def _write(
        self,
        ranks: list[dict[str, Any]],
        position: EpochPosition | None,
        write_last: bool,
    ) -> None:
        state, folder, saving = self.state, self.folder, self.config["checkpoint"]
        self.write_pending_best()  # first: a last.pt on disk never names a best epoch that best.pt lacks
        if write_last:
            ckpt.atomic_save(
                {
                    "model": ckpt.model_state(self.net),
                    "optimizer": state.optimizer.state_dict(),
                    "scaler": state.scaler.state_dict() if state.scaler is not None else None,
                    "schedule": state.schedule.state_dict(),
                    "global_step": state.global_step,
                    "book": self.book,
                    "conv1": self.conv1,
                    "rng": [rank["rng"] for rank in ranks],
                    "loaders": [rank["loader"] for rank in ranks],  # backend streams (DALI's RNGs), per rank
                    # inside an epoch: where each rank stands (None: at the end of epoch book["epoch"])
                    "position": None
                    if position is None
                    else {
                        "epoch": position.epoch,
                        "batch": position.batch,
                        "ranks": [rank["position"] for rank in ranks],
                    },
                    "config": self.config,
                },
                folder / "last.pt",
            )
        if saving["save_conv1"] and position is None:
            ckpt.save_conv1(folder / "conv1.pt", self.conv1)

    def _write_record(self) -> None:
        """Debug trace (``training.record_samples``): per rank, the (label, pixel sum) of every training sample
        seen and the final flat parameters; gathered to rank 0, written to ``samples.pt``."""
        record = self.record or []
        mine = {
            "samples": torch.cat(record) if record else torch.empty(0, 2, dtype=torch.float64),
            "params": torch.cat([p.detach().cpu().double().flatten() for p in self.net.parameters()]),
        }
        everyone = distributed.gather_objects(mine, self.env)
        if self.env.is_main:
            ckpt.atomic_save({"ranks": everyone}, self.folder / "samples.pt")
