"""Learning-rate schedules for `configure_optimizers`, composed from torch's own schedulers.

Composing LinearLR, ConstantLR and a cosine stage with SequentialLR (rather than writing
the curve as a LambdaLR, whose function a checkpoint cannot hold) keeps checkpoints plain
scheduler state that Lightning saves and restores without help.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ConstantLR, LinearLR, LRScheduler, SequentialLR

from core.optimizer import require

KINDS = ("cosine", "linear", "constant")
INTERVALS = ("step", "epoch")
_HOLD_FOREVER = 2**62
"""ConstantLR's total_iters for the hold stage: an end it never reaches, so the lr stays put."""


class CosineToFloor(LRScheduler):
    """Each group's lr from its own starting lr down a half cosine to floor_ratio times it
    over total_iters steps, then held there.

    torch's CosineAnnealingLR has one eta_min for every group, so a group started below
    the others (a layer-wise lr) would climb towards it instead of decaying. Its state
    (last_epoch, base_lrs and these two numbers) is plain values, as Lightning saves it;
    it stands where CosineAnnealingLR stood, whose saved state it loads (its own numbers
    come from the schedule, so an older checkpoint continues on the per-group curve).
    """

    def __init__(
        self, optimizer: Optimizer, total_iters: int, floor_ratio: float, last_epoch: int = -1
    ) -> None:
        self.total_iters = total_iters
        self.floor_ratio = floor_ratio
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        _follow_added_groups(self.optimizer, [self])
        progress = min(max(self.last_epoch, 0), self.total_iters) / self.total_iters
        factor = self.floor_ratio + (1 - self.floor_ratio) * (1 + math.cos(math.pi * progress)) / 2
        return [base_lr * factor for base_lr in self.base_lrs]


def _follow_added_groups(optimizer: Optimizer, schedulers: list[LRScheduler]) -> None:
    """Give the schedulers a starting lr for each param group added after they were built.

    BackboneFinetuning (and anyone calling optimizer.add_param_group mid-run) adds a group
    the schedulers have no starting lr for; torch's closed-form steps then fail. Every
    scheduler here scales each group's starting lr by one shared multiplier, so a group
    that joins takes the lr it joined with as its value at the current point of the curve
    and follows the curve from there.
    """
    groups, known = optimizer.param_groups, schedulers[0].base_lrs
    if len(groups) <= len(known):
        return
    multiplier = next(
        (float(g["lr"]) / base for g, base in zip(groups, known, strict=False) if base), 0.0
    )
    for group in groups[len(known) :]:
        joined_at = float(group["lr"])
        base = joined_at / multiplier if multiplier else joined_at
        group.setdefault("initial_lr", base)
        for scheduler in schedulers:
            scheduler.base_lrs.append(base)


class StagedLR(SequentialLR):
    """SequentialLR whose stages also move param groups added after it was built."""

    def step(self) -> None:  # type: ignore[override]
        _follow_added_groups(self.optimizer, self._schedulers)
        super().step()


@dataclass(frozen=True)
class LRSchedule:
    """A learning-rate schedule: linear warmup, then cosine or linear decay, or a constant lr.

    Counts are scheduler steps: one per `frequency` intervals (optimizer steps when
    interval is 'step'). LightningCLI shows these fields under `--model.<arg>.help`.

    Args:
        kind: What follows the warmup: 'cosine' or 'linear' decay from the peak lr to
            min_lr_ratio x peak at total_steps (then held there), or 'constant'.
        warmup_steps: Scheduler steps of linear warmup, from peak/(warmup_steps+1) up to
            the peak; 0 starts at the peak.
        total_steps: Length of warmup plus decay. None asks the trainer:
            estimated_stepping_batches (interval 'step') or max_epochs ('epoch'),
            divided by frequency.
        min_lr_ratio: The final lr as a fraction of the peak lr (cosine and linear).
        interval: 'step' or 'epoch': when Lightning steps the scheduler.
        frequency: Step the scheduler once every this many intervals.
        name: The key LearningRateMonitor logs under; None keeps Lightning's 'lr-<Optimizer>'.
    """

    kind: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    total_steps: int | None = None
    min_lr_ratio: float = 0.0
    interval: Literal["step", "epoch"] = "step"
    frequency: int = 1
    name: str | None = None

    def __post_init__(self) -> None:
        require(self.kind in KINDS, "scheduler kind", self.kind, f"one of {', '.join(KINDS)}")
        require(_is_int(self.warmup_steps, 0), "warmup_steps", self.warmup_steps, "an int >= 0")
        require(
            self.total_steps is None
            or (_is_int(self.total_steps, 1) and self.kind == "constant")
            or (_is_int(self.total_steps, 1) and self.total_steps > self.warmup_steps),
            "total_steps",
            self.total_steps,
            f"None or an int >= 1, and more than warmup_steps ({self.warmup_steps}) for a "
            f"{self.kind} schedule",
        )
        require(
            isinstance(self.min_lr_ratio, (int, float))
            and not isinstance(self.min_lr_ratio, bool)
            and 0.0 <= self.min_lr_ratio <= 1.0,
            "min_lr_ratio",
            self.min_lr_ratio,
            "a number in [0, 1]",
        )
        require(self.interval in INTERVALS, "interval", self.interval, "'step' or 'epoch'")
        require(_is_int(self.frequency, 1), "frequency", self.frequency, "an int >= 1")
        require(
            self.name is None or isinstance(self.name, str), "name", self.name, "None or a string"
        )

    @classmethod
    def coerce(cls, spec: LRSchedule | str | Mapping[str, Any]) -> LRSchedule:
        """An LRSchedule from itself, a kind name ('cosine') or a dict of its fields (YAML)."""
        if isinstance(spec, LRSchedule):
            return spec
        if isinstance(spec, str):
            return cls(kind=spec)  # type: ignore[arg-type]
        if isinstance(spec, Mapping):
            allowed = [f.name for f in fields(cls)]
            unknown = sorted(set(spec) - set(allowed), key=str)  # keys of mixed types: 5, 'x'
            require(not unknown, "scheduler key", unknown, f"keys among {', '.join(allowed)}")
            return cls(**spec)
        raise TypeError(
            f"Invalid scheduler: {spec!r}. Allowed: None, one of {', '.join(KINDS)}, "
            "an LRSchedule, or a dict of LRSchedule fields."
        )

    def build(self, optimizer: Optimizer) -> LRScheduler:
        """The torch scheduler for `optimizer`, whose groups' current lr is the peak."""
        require(self.total_steps is not None, "total_steps", None, "an int to build a scheduler")
        decay_steps = self.total_steps - self.warmup_steps
        stages: list[LRScheduler] = []
        milestones: list[int] = []
        if self.warmup_steps:
            start = 1.0 / (self.warmup_steps + 1)
            stages.append(LinearLR(optimizer, start, 1.0, total_iters=self.warmup_steps))
            milestones.append(self.warmup_steps)
        if self.kind == "cosine":
            stages.append(CosineToFloor(optimizer, decay_steps, self.min_lr_ratio))
            # The hold stage CosineToFloor does not need keeps the stages of checkpoints
            # saved while the cosine stage was CosineAnnealingLR, which SequentialLR loads
            # by position.
            stages.append(ConstantLR(optimizer, self.min_lr_ratio, total_iters=_HOLD_FOREVER))
            milestones.append(self.total_steps)
        elif self.kind == "linear":
            stages.append(LinearLR(optimizer, 1.0, self.min_lr_ratio, total_iters=decay_steps))
        else:
            stages.append(ConstantLR(optimizer, 1.0, total_iters=0))
        if len(stages) == 1:
            return stages[0]
        return StagedLR(optimizer, stages, milestones)

    def with_total_from(self, trainer: Any) -> LRSchedule:
        """This schedule with total_steps from the trainer's own count of what it will run."""
        if self.total_steps is not None:
            return self
        if self.interval == "step":
            total = trainer.estimated_stepping_batches
            source = "trainer.estimated_stepping_batches"
            if 0 in (trainer.max_steps, trainer.limit_train_batches, trainer.num_training_batches):
                # No step will run (max_steps=0, limit_train_batches=0): any schedule does.
                return replace(self, total_steps=self.warmup_steps + 1)
            require(
                total != -1,  # Lightning's answer for epochs of unknown length
                "total_steps",
                None,
                "an int when the trainer cannot count its steps: the training dataloader "
                "has no length (an IterableDataset without __len__) and max_steps is not "
                "set; set max_steps on the Trainer, or total_steps",
            )
        else:
            total = trainer.max_epochs
            source = "trainer.max_epochs"
        if total == 0:  # no step or no epoch will run (max_epochs=0), as above
            return replace(self, total_steps=self.warmup_steps + 1)
        require(
            total is not None and math.isfinite(total) and total >= 0,
            "total_steps",
            None,
            f"an int when the trainer does not bound training ({source} is {total}); "
            "set total_steps, or "
            + ("max_epochs" if self.interval == "epoch" else "max_steps or max_epochs")
            + " on the Trainer",
        )
        if self.interval == "step":
            steps = _step_scheduler_calls(trainer, self.frequency, int(total))
        else:
            steps = int(total) // self.frequency  # Lightning: (epoch + 1) % frequency == 0
        too_short = steps == 0 or (self.kind != "constant" and steps <= self.warmup_steps)
        if too_short and getattr(trainer, "fast_dev_run", False):
            # A smoke test of the real run's config: its length is not this run's, so the
            # schedule is built long enough to be valid and the run stays in its warmup.
            rank_zero_info(
                f"fast_dev_run: the {self.kind} schedule is built for {self.warmup_steps + 1} "
                f"{self.interval}s (warmup_steps={self.warmup_steps}) instead of {steps}."
            )
            return replace(self, total_steps=self.warmup_steps + 1)
        if steps == 0:
            self._refuse_never_stepped(trainer, int(total))
        require(
            not too_short,
            "total_steps",
            None,
            f"more than warmup_steps ({self.warmup_steps}) for a {self.kind} schedule; taken "
            f"from {source} ({total}) it is {steps}: train longer (max_steps, max_epochs), "
            "or set total_steps or fewer warmup_steps",
        )
        return replace(self, total_steps=steps)

    def _refuse_never_stepped(self, trainer: Any, total: int) -> None:
        """Raise why Lightning would never step this scheduler in the trainer's run.

        The count of scheduler steps is 0 for two different reasons, with different fixes:
        a run shorter than the first step (train longer or lower frequency), or, for a
        'step' interval, no batch of an epoch at which Lightning steps it at all (training
        longer never helps).
        """
        accumulate = trainer.accumulate_grad_batches
        if self.interval == "epoch":
            allowed = (
                f"at most trainer.max_epochs ({total}) for an 'epoch' schedule: Lightning steps "
                "it after each epoch whose number (from 1) is a multiple of frequency, so in "
                f"{total} epochs it would never step; lower frequency or raise max_epochs"
            )
        elif (first := _first_scheduler_step(trainer, self.frequency)) is None:
            batches = int(trainer.num_training_batches)
            divisors = f"the batches an epoch ({batches})"
            if batches >= accumulate:
                divisors = f"accumulate_grad_batches ({accumulate}) or of {divisors}"
            allowed = (
                "a frequency Lightning steps the scheduler at: it steps a 'step' schedule after "
                "a batch whose index in the epoch (from 1) is a multiple of frequency and "
                "that ends a gradient-accumulation window (a multiple of "
                f"accumulate_grad_batches={accumulate}, or the epoch's last of {batches}); "
                "no batch is both, so it would never step however long training runs; set "
                f"frequency to a divisor of {divisors}, or change accumulate_grad_batches"
            )
        else:
            allowed = (
                f"a frequency the run reaches: Lightning first steps this scheduler after {first} "
                f"optimizer steps (frequency {self.frequency}, accumulate_grad_batches "
                f"{accumulate}), and the trainer runs {total} "
                "(trainer.estimated_stepping_batches), so it would never step; lower "
                "frequency, or train longer (max_steps, max_epochs)"
            )
        require(False, "frequency", self.frequency, allowed)


def _step_scheduler_calls(trainer: Any, frequency: int, optimizer_steps: int) -> int:
    """How often Lightning steps a 'step'-interval scheduler of this frequency over
    optimizer_steps: after a batch that ends an accumulation window (its 1-based index in
    the epoch a multiple of accumulate_grad_batches, or the epoch's last) whose index is a
    multiple of frequency, so with accumulation the count is not optimizer_steps //
    frequency (frequency 2 under accumulation 2 steps it at every optimizer step). An epoch
    of unknown length (an IterableDataset) is taken as endless; one that ends restarts
    the batch index, which no count ahead of training can know: set total_steps there."""
    if frequency == 1:
        return optimizer_steps
    batches, accumulate = trainer.num_training_batches, trainer.accumulate_grad_batches
    if not math.isfinite(batches):  # one endless epoch: windows end at multiples only
        return optimizer_steps // (frequency // math.gcd(frequency, accumulate))
    window_ends = _window_ends(int(batches), accumulate)
    epochs, rest = divmod(optimizer_steps, len(window_ends))
    per_epoch = sum(1 for b in window_ends if b % frequency == 0)
    return epochs * per_epoch + sum(1 for b in window_ends[:rest] if b % frequency == 0)


def _window_ends(batches: int, accumulate: int) -> list[int]:
    """The 1-based indices of an epoch's batches after which the optimizer steps."""
    return [b for b in range(1, batches + 1) if b % accumulate == 0 or b == batches]


def _first_scheduler_step(trainer: Any, frequency: int) -> int | None:
    """After how many optimizer steps Lightning first steps a 'step' scheduler of this
    frequency; None when no batch of an epoch is one it steps at (every epoch restarts the
    batch index, so a longer run never reaches one)."""
    batches, accumulate = trainer.num_training_batches, trainer.accumulate_grad_batches
    if not math.isfinite(batches):
        return frequency // math.gcd(frequency, accumulate)
    window_ends = _window_ends(int(batches), accumulate)
    return next((i for i, b in enumerate(window_ends, 1) if b % frequency == 0), None)


# Modules keep an LRSchedule in their hparams; it holds plain fields and runs no code when
# unpickled, so checkpoints holding one still load with torch.load(weights_only=True).
torch.serialization.add_safe_globals([LRSchedule])


def _is_int(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low
