"""Learning-rate schedules for `configure_optimizers`: a torch LRScheduler in closed form.

Each group's lr is its starting lr times the curve's factor at the scheduler's step, and
the scheduler's checkpoint state is plain values (its place on the curve), which
Lightning saves and restores without help. The curve itself always comes from the
configuration, so a run resumed with a changed schedule follows the configured one.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from core.optimizer import require

KINDS = ("cosine", "linear", "constant")
INTERVALS = ("step", "epoch")
_CURVE = ("kind", "warmup_steps", "total_steps", "min_lr_ratio")
"""The attributes of ScheduledLR that define its curve (saved, but taken from the config)."""
_PENDING_COUNT = ("_total_from", "_count_before_stepping")
"""A ScheduledLR's means of counting total_steps from the trainer (never saved: counted by
then)."""


class ScheduledLR(LRScheduler):
    """An LRSchedule's curve: each group's lr is its own starting lr times the curve's
    factor at the current step (a layer-wise lr keeps its ratio to the others).

    Its checkpoint holds where on the curve it stands (last_epoch, base_lrs) and the
    curve it followed; loading takes the place and keeps the configured curve, setting
    each group's lr to it. torch's schedulers restore their own parameters instead, so a
    run resumed to train longer (total_steps taken from a larger max_epochs) stayed at
    the old schedule's end: lr 0 for every further step. It also loads the state of the
    torch schedulers it was composed of before (SequentialLR of LinearLR, a cosine stage
    and ConstantLR, or one LinearLR or ConstantLR), and continues from their step.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        schedule: LRSchedule,
        last_epoch: int = -1,
        total_from: Callable[[bool], int | None] | None = None,
    ) -> None:
        """total_from: what counts total_steps from the trainer (see LRSchedule.counted_by):
        once it is safe to ask where the schedule has none yet, and again whenever its
        state is restored."""
        require(
            schedule.total_steps is not None or total_from is not None,
            "total_steps",
            None,
            "an int to build",
        )
        self.kind = schedule.kind
        self.warmup_steps = schedule.warmup_steps
        self.total_steps = schedule.total_steps
        self.min_lr_ratio = schedule.min_lr_ratio
        self._total_from = total_from
        self._count_before_stepping = None
        if self.total_steps is None:
            # At the latest before the first optimizer step (Lightning runs torch's step
            # pre-hooks before the closure, so before backward and any released step): a
            # checkpoint without this scheduler's state never calls load_state_dict, and a
            # too-short schedule must be refused before any weight changes.
            count = _weakly(self._count_total_steps)
            self._count_before_stepping = optimizer.register_step_pre_hook(
                lambda *_: count(inside_the_hook=True)
            )
        super().__init__(optimizer, last_epoch)
        # The scheduler owns the lr: an optimizer state loaded without this scheduler's
        # (a checkpoint of a run without it) brought its own lr back into the groups, and
        # the first resumed step ran at it instead of at the curve's value.
        # Held weakly, as the optimizer holds no scheduler: one discarded (or replaced by
        # another) must not go on writing its lrs into each loaded state.
        optimizer.register_load_state_dict_post_hook(_weakly(self._restore_the_curves_lr))

    def _restore_the_curves_lr(self, optimizer: Optimizer) -> None:
        for group, lr in zip(optimizer.param_groups, self._last_lr, strict=False):
            group["lr"] = lr

    def _count_total_steps(self, inside_the_hook: bool = False, again: bool = False) -> None:
        if self._total_from is not None and (again or self.total_steps is None):
            total = self._total_from(inside_the_hook)
            if total is None:
                return
            self.total_steps = total
        # torch iterates its hooks while calling them: the hook stays (doing nothing) until
        # the next count from elsewhere takes it away
        if self._count_before_stepping is not None and not inside_the_hook:
            self._count_before_stepping.remove()
            self._count_before_stepping = None

    def factor(self, step: int) -> float:
        """The multiple of each group's starting lr at this step."""
        step, warmup = max(step, 0), self.warmup_steps
        if step < warmup:  # linear from 1/(warmup + 1) up to 1
            return (step + 1) / (warmup + 1)
        if self.kind == "constant" or step == warmup:  # the peak, whatever the length
            return 1.0
        self._count_total_steps()
        assert self.total_steps is not None
        decay = self.total_steps - warmup
        progress = min(step - warmup, decay) / decay
        floor = self.min_lr_ratio
        if self.kind == "cosine":
            return floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2
        return 1.0 - (1.0 - floor) * progress

    def get_lr(self) -> list[float]:  # type: ignore[override]
        _follow_added_groups(self.optimizer, self)
        factor = self.factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]

    _get_closed_form_lr = get_lr

    def state_dict(self) -> dict[str, Any]:
        """As torch's, with the curve's length counted (never the counter itself)."""
        self._count_total_steps()
        state = super().state_dict()
        for pending in _PENDING_COUNT:
            state.pop(pending, None)
        return state

    def __getstate__(self) -> dict[str, Any]:
        """For pickle and deepcopy: counted first, as state_dict is, since what counts
        (a closure over the trainer) and its hook on the optimizer are not the scheduler's
        to copy."""
        self._count_total_steps()
        return {key: value for key, value in self.__dict__.items() if key not in _PENDING_COUNT}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._total_from = self._count_before_stepping = None
        self.optimizer.register_load_state_dict_post_hook(_weakly(self._restore_the_curves_lr))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The saved place on the curve (of this class or of the torch schedulers it was
        composed of), on the configured curve; each group's lr set to it. A length left to
        the trainer is counted here (again), where Lightning restores schedulers: after its
        loops, so the count loads the training data with the checkpoint's place in the
        epoch, and after a tuner's trial run inside the fit (BatchSizeFinder's batch size
        changes what the fit will run)."""
        self._count_total_steps(again=True)
        saved = dict(state_dict)
        stages = saved.get("_schedulers")  # SequentialLR: its first stage holds base_lrs
        base_lrs = saved.get("base_lrs") or (stages[0].get("base_lrs") if stages else None)
        require(
            _is_int(saved.get("last_epoch"), -1) and isinstance(base_lrs, list),
            "scheduler state_dict",
            sorted(saved, key=str),
            "the state of a ScheduledLR or of torch's LinearLR, ConstantLR or SequentialLR "
            "(last_epoch and base_lrs)",
        )
        changed = {
            key: (saved[key], getattr(self, key))
            for key in _CURVE
            if key in saved and saved[key] != getattr(self, key)
        }
        if changed:
            described = ", ".join(
                f"{key} {new!r} (saved {old!r})" for key, (old, new) in changed.items()
            )
            rank_zero_info(
                f"Resuming on the configured schedule from step {saved['last_epoch']}: {described}."
            )
        self.last_epoch = saved["last_epoch"]
        self.base_lrs = list(base_lrs)
        saved_lrs = saved.get("_last_lr")
        if isinstance(saved_lrs, list) and all(isinstance(lr, float | int) for lr in saved_lrs):
            # The lrs when it was saved, which a group added since (BackboneFinetuning)
            # joined beside: the curve's point _follow_added_groups reads, whatever an
            # optimizer state loaded before wrote into the groups (_restore_the_curves_lr).
            for group, lr in zip(
                self.optimizer.param_groups, saved_lrs[: len(base_lrs)], strict=False
            ):
                group["lr"] = lr
        self._step_count = saved.get("_step_count", self.last_epoch + 1)
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr, strict=False):
            group["lr"] = lr


def _weakly(method: Callable[..., None]) -> Callable[..., None]:
    """method of an object the caller does not keep alive: a call once it is gone does
    nothing."""
    held = weakref.WeakMethod(method)

    def call(*args: Any, **kwargs: Any) -> None:
        alive = held()
        if alive is not None:
            alive(*args, **kwargs)

    return call


def _follow_added_groups(optimizer: Optimizer, scheduler: LRScheduler) -> None:
    """Give the scheduler a starting lr for each param group added after it was built.

    BackboneFinetuning (and anyone calling optimizer.add_param_group mid-run) adds a group
    the scheduler has no starting lr for. Every group's lr is its starting lr times one
    shared factor, so a group that joins takes the lr it joined with as its value at the
    current point of the curve and follows the curve from there.
    """
    groups, known = optimizer.param_groups, scheduler.base_lrs
    if len(groups) <= len(known):
        return
    multiplier = next(
        (float(g["lr"]) / base for g, base in zip(groups, known, strict=False) if base), 0.0
    )
    for group in groups[len(known) :]:
        joined_at = float(group["lr"])
        base = joined_at / multiplier if multiplier else joined_at
        group.setdefault("initial_lr", base)
        known.append(base)


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

    def build(
        self, optimizer: Optimizer, total_from: Callable[[bool], int | None] | None = None
    ) -> LRScheduler:
        """The torch scheduler for `optimizer`, whose groups' current lr is the peak;
        total_from counts total_steps later where they are None (see counted_by)."""
        return ScheduledLR(optimizer, self, total_from=total_from)

    def counted_by(self, trainer: Any) -> tuple[LRSchedule, Callable[[bool], int | None] | None]:
        """This schedule with total_steps counted by the trainer (with_total_from), and what
        counts them again whenever the scheduler is restored (its load_state_dict): after
        a tuner's trial inside the fit, which may change the batch size (BatchSizeFinder),
        or from the fit's checkpoint. When the fit may resume from a checkpoint Lightning
        restores later, the first count waits for that restore or, at the latest, the
        optimizer's first step: counting loads the training data, and data Lightning loads
        before it restores its loops keeps no place in the epoch (Lightning issue 20550):
        a fit resumed mid-epoch would restart the epoch's data while counting its batches
        from the saved place."""
        if self.total_steps is not None:
            return self, None

        def count(before_a_step: bool) -> int | None:
            # An optimizer step before the fit loop has its data is none of training's:
            # torch.distributed.checkpoint steps a stateless optimizer once to make its
            # state while loading the checkpoint (ModelParallelStrategy), before the loops
            # are restored.
            if before_a_step and trainer.train_dataloader is None:
                return None
            total = self.with_total_from(trainer).total_steps
            assert total is not None
            return total

        if not _may_restore_a_fit(trainer):
            return self.with_total_from(trainer), count
        return self, count

    def with_total_from(self, trainer: Any) -> LRSchedule:
        """This schedule with total_steps from the trainer's own count of what it will run."""
        if self.total_steps is not None:
            return self
        estimated = trainer.estimated_stepping_batches  # also loads the training data,
        if getattr(trainer, "train_dataloader", True) is None:  # but not with max_epochs=-1
            trainer.fit_loop.setup_data()  # what the property runs to count epochs' batches
        scheduled = _scheduled_accumulation(trainer)
        # The run epoch by epoch, where the trainer's own count falls short: accumulation
        # that changes by epoch, or an 'epoch' schedule that max_steps may end first.
        bounded_by_steps = self.interval == "epoch" and trainer.max_steps not in (None, -1)
        epochs, cut = (
            _epoch_windows(trainer, scheduled)
            if scheduled is not None or bounded_by_steps
            else (None, False)
        )
        epochs_stepped = None  # epochs after which Lightning steps an 'epoch' scheduler
        if self.interval == "step":
            total = estimated
            source = "trainer.estimated_stepping_batches"
            if 0 in (
                trainer.max_steps,
                trainer.max_epochs,  # Lightning's estimate counts max(max_epochs, 1) epochs
                trainer.limit_train_batches,
                trainer.num_training_batches,
            ):
                # No step will run (max_steps=0, max_epochs=0, limit_train_batches=0): any
                # schedule does.
                return replace(self, total_steps=self.warmup_steps + 1)
            if epochs is not None:
                # Lightning's estimate takes the accumulation of the epoch it is asked in.
                total = sum(map(len, epochs))
                source = "the epochs' optimizer steps under the GradientAccumulationScheduler"
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
            if (
                bounded_by_steps
                and epochs is not None
                and (total in (None, -1) or len(epochs) < total)
            ):
                # max_steps ends training first: the epochs it leaves, the last perhaps cut
                # short (trained at the curve's last value, as a max_epochs run's last epoch
                # is; Lightning steps no 'epoch' scheduler after a cut epoch)
                total, source = len(epochs), "the epochs trainer.max_steps leaves"
                epochs_stepped = len(epochs) - cut
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
        if self.interval == "step" and epochs is not None:
            steps = sum(1 for ends in epochs for batch in ends if batch % self.frequency == 0)
        elif self.interval == "step":
            steps = _step_scheduler_calls(trainer, self.frequency, int(total))
        else:
            steps = int(total) // self.frequency  # Lightning: (epoch + 1) % frequency == 0
            if epochs_stepped is not None and epochs_stepped // self.frequency == 0:
                steps = 0  # its only step would follow the epoch max_steps cuts short
        too_short = steps == 0 or (self.kind != "constant" and steps <= self.warmup_steps)
        if too_short and getattr(trainer, "fast_dev_run", False):
            # A smoke test of the real run's config: its length is not this run's, so the
            # schedule is built long enough to be valid and the run stays in its warmup.
            rank_zero_info(
                f"fast_dev_run: the {self.kind} schedule is built for {self.warmup_steps + 1} "
                f"{self.interval}s (warmup_steps={self.warmup_steps}) instead of {steps}."
            )
            return replace(self, total_steps=self.warmup_steps + 1)
        if steps == 0 and epochs_stepped is not None and epochs_stepped < total:
            # the last epoch is one max_steps cuts short, after which Lightning steps no
            # 'epoch' scheduler: the limit is the whole epochs before it
            total = epochs_stepped
            source = "the whole epochs trainer.max_steps leaves (it cuts the last short)"
        if steps == 0:
            self._refuse_never_stepped(trainer, int(total), source)
        require(
            not too_short,
            "total_steps",
            None,
            f"more than warmup_steps ({self.warmup_steps}) for a {self.kind} schedule; taken "
            f"from {source} ({total}) it is {steps}: train longer (max_steps, max_epochs), "
            "or set total_steps or fewer warmup_steps",
        )
        return replace(self, total_steps=steps)

    def _refuse_never_stepped(self, trainer: Any, total: int, source: str) -> None:
        """Raise why Lightning would never step this scheduler in the trainer's run.

        The count of scheduler steps is 0 for two different reasons, with different fixes:
        a run shorter than the first step (train longer or lower frequency), or, for a
        'step' interval, no batch of an epoch at which Lightning steps it at all (training
        longer never helps).
        """
        accumulate = trainer.accumulate_grad_batches
        if self.interval == "epoch":
            allowed = (
                f"at most {source} ({total}) for an 'epoch' schedule: Lightning steps "
                "it after each epoch whose number (from 1) is a multiple of frequency, so in "
                f"{total} epoch{'s' * (total != 1)} it would never step; lower frequency or "
                "raise max_epochs" + (" and max_steps" if source != "trainer.max_epochs" else "")
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
                f"({source}), so it would never step; lower "
                "frequency, or train longer (max_steps, max_epochs)"
            )
        require(False, "frequency", self.frequency, allowed)


def _may_restore_a_fit(trainer: Any) -> bool:
    """Whether this fit resumes, or may, from a checkpoint Lightning has not restored yet:
    one it has loaded (ckpt_path), or any under a strategy that loads it only after
    configure_optimizers (FSDP, DeepSpeed, ModelParallel restore after setting up)."""
    state = getattr(trainer, "state", None)
    strategy = getattr(trainer, "strategy", None)
    return getattr(state, "fn", None) == TrainerFn.FITTING and (
        getattr(trainer, "ckpt_path", None) is not None
        or bool(getattr(strategy, "restore_checkpoint_after_setup", False))
    )


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


def _scheduled_accumulation(trainer: Any) -> Callable[[int], int] | None:
    """A GradientAccumulationScheduler's accumulation for each epoch, None without one: it
    sets the trainer's at every epoch start, after the optimizer and its schedule were
    built, so the trainer's own count (estimated_stepping_batches) took one epoch's value
    for all (a linear decay built 24 steps long for a run of 16 stopped at a third)."""
    for callback in getattr(trainer, "callbacks", None) or []:
        if isinstance(callback, GradientAccumulationScheduler):
            return callback.get_accumulate_grad_batches
    return None


def _epoch_windows(
    trainer: Any, accumulation: Callable[[int], int] | None
) -> tuple[list[list[int]] | None, bool]:
    """Each epoch's window ends (the 1-based batch indices the optimizer steps after) over
    the run: epochs up to max_epochs, the last cut where max_steps ends training; and
    whether it was cut. None when an epoch has no known length or the run no bound."""
    batches = trainer.num_training_batches
    max_epochs = None if trainer.max_epochs in (None, -1) else trainer.max_epochs
    max_steps = None if trainer.max_steps in (None, -1) else trainer.max_steps
    if not math.isfinite(batches) or int(batches) == 0 or max_epochs is max_steps is None:
        return None, False
    per_accumulation: dict[int, list[int]] = {}
    epochs: list[list[int]] = []
    steps, cut = 0, False
    while (max_epochs is None or len(epochs) < max_epochs) and (
        max_steps is None or steps < max_steps
    ):
        accumulate = (
            trainer.accumulate_grad_batches if accumulation is None else accumulation(len(epochs))
        )
        if accumulate not in per_accumulation:
            per_accumulation[accumulate] = _window_ends(int(batches), accumulate)
        ends = per_accumulation[accumulate]
        if max_steps is not None and steps + len(ends) > max_steps:
            ends, cut = ends[: max_steps - steps], True
        epochs.append(ends)
        steps += len(ends)
    return epochs, cut


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
