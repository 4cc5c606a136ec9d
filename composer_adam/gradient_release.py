"""Gradient release in a Composer Trainer: each parameter steps inside backward.

core's release hooks (`core.prepare_for_gradient_release`) step a parameter and free its
gradient as soon as backward has produced it. Composer accumulates microbatch gradients
before one optimizer step, so by default this callback arms the hooks only for the last
microbatch of each batch: parameters are then updated exactly as an ordinary step would
update them, and every gradient is freed the moment it is used. With
`optimizer_accumulation=True` the hooks stay armed and earlier microbatches are folded
into the moments instead (`optimizer.optimizer_accumulation`), so no microbatch ever
keeps a full set of gradients; m is exact, v approximate (see core.optimizer.window_terms).

The Trainer's own `optimizer.step(closure)` keeps working: it runs the microbatches
(where the hooks step) and then steps whatever was not released.
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from composer.algorithms import SAM, GradientClipping
from composer.callbacks import OptimizerMonitor
from composer.core import Callback, DataSpec, Precision, State
from composer.loggers import Logger
from composer.utils import dist
from torch import Tensor
from torch.utils.hooks import RemovableHandle

import core
from composer_adam.optimizers import rank_share
from core import metrics
from core.backends.views import dtensor_type
from core.optimizer import AdamFamilyOptimizer

log = logging.getLogger(__name__)

_COUNT_TOLERANCE = 1e-6
"""Relative shortfall of a batch's summed fractional microbatch counts that still reaches
its count: summed per microbatch they may round below the batch's own sum (float32 sums
do by about 1e-7). Whole counts sum exactly and are compared exactly (a last microbatch of
2 tokens in 2,000,002 is the last); a microbatch with samples after the count was reached
is refused, not dropped."""


_callback_of: weakref.WeakKeyDictionary[AdamFamilyOptimizer, weakref.ref[GradientRelease]] = (
    weakref.WeakKeyDictionary()
)
"""The GradientRelease that armed each optimizer last, held weakly both ways (the callback
holds its optimizer: a strong value would have kept every fitted optimizer and model)."""


def _warn_of_windows_left_open(optimizer: AdamFamilyOptimizer) -> None:
    """Composer drops a batch that does not finish (it zeroes gradients at each batch's
    start) and checkpoints only at a batch's end, so a window open at fit start was left
    by a fit that raised inside a batch (a KeyboardInterrupt, an error in a callback).
    Its micro-batches are folded into the moments and cannot be taken out: the new fit's
    first step closes the window with them (measured: 0.45 lr off in that step, with 3
    folded micro-batches of 4). Said, not refused: loading a checkpoint drops them."""
    windows = optimizer.open_windows()
    if not windows:
        return
    counts = sorted(set(windows.values()))
    warnings.warn(
        f"GradientRelease: {len(windows)} parameter(s) hold an optimizer-accumulation "
        f"window left open by a fit that stopped inside a batch ({counts} micro-batches "
        "folded into their moments). Composer drops a batch that does not finish, but "
        "folded micro-batches cannot be taken out of the moments: this fit's first step "
        "closes those windows together with its first batch. To start from a batch's end "
        "instead, load a checkpoint into the optimizer (the Trainer's load_path) first.",
        UserWarning,
        stacklevel=2,
    )


class GradientRelease(Callback):
    """Step each parameter inside backward and free its gradient (adamkit optimizers
    created with `gradient_release=True`).

    An OptimizerMonitor in the same Trainer would see no gradients at batch end, so this
    callback takes over its logging: the same keys on the same batches, from gradient
    norms taken in backward just before release. With optimizer accumulation those
    norms are of the last microbatch's gradient (the batch's sum is never formed).

    On more than one rank it needs FSDP2 (`parallelism_config={"fsdp": FSDP2Config()}`):
    FSDP2 runs each sharded parameter's hooks after its reduce-scatter, so the step sees
    the averaged gradient and frees the sharded one. Refused at fit start, because they
    cannot work: AMP_FP16 (the GradScaler unscales and skips steps after backward, when
    parameters are already updated), the GradientClipping and SAM algorithms (they need
    every gradient at once), and more than one rank without FSDP2 (DDP, or FSDP1, whose
    parameters are not DTensors: the hooks would step on each rank's local gradient
    before the all-reduce).

    Args:
        optimizer_accumulation: Fold earlier microbatches into the moments instead of
            keeping their gradients (saves the gradient memory across microbatches;
            AdamW and RAdam only, v approximate), each weighted by its share of the
            batch's samples as Composer weights its loss (on several ranks, the
            microbatch's samples on every rank: one all-reduce per microbatch).
        get_num_samples_in_batch: How to count samples in a batch, to tell the last
            microbatch and each microbatch's share; needed only if the train DataSpec
            defines its own, or to count loss-generating tokens when the Trainer has
            accumulate_train_batch_on_tokens=True (Composer then scales losses by them).
    """

    def __init__(
        self,
        optimizer_accumulation: bool = False,
        get_num_samples_in_batch: Callable[[Any], int | float] | None = None,
    ) -> None:
        if not isinstance(optimizer_accumulation, bool):
            raise ValueError(
                f"Invalid optimizer_accumulation: {optimizer_accumulation!r}. "
                "Allowed: True or False."
            )
        if get_num_samples_in_batch is not None and not callable(get_num_samples_in_batch):
            raise ValueError(
                f"Invalid get_num_samples_in_batch: {get_num_samples_in_batch!r}. Allowed: "
                "None, or a function of a batch that returns its number of samples."
            )
        self.optimizer_accumulation = optimizer_accumulation
        self._count_samples = get_num_samples_in_batch or DataSpec([]).get_num_samples_in_batch
        self._optimizer: AdamFamilyOptimizer | None = None
        self._model: torch.nn.Module | None = None
        self._registration: object | None = None  # the release this callback made
        self._monitors: list[tuple[int, OptimizerMonitor]] = []
        self._norm_hooks: list[RemovableHandle] = []
        # Per released parameter: its last microbatch's gradient norm as Composer's
        # OptimizerMonitor takes it (in the gradient's dtype) and as adamkit's
        # report_per_parameter_metrics does (float32 at least), for either monitor setting.
        self._grad_norms: dict[Tensor, tuple[Tensor, Tensor]] = {}
        # The batch's samples and those of its microbatches so far, summed over the ranks;
        # whether this microbatch's backward steps or folds, is the last (its gradient
        # norms recorded), or comes after the last (its zero gradients dropped).
        self._batch_samples = self._seen_samples = 0.0
        self._stepping = self._recording = self._dropping = self._past_last = False
        # What the last microbatch's hooks stepped, whose gradients a microbatch after it
        # (zero) must not leave for optimizer.step() to step again.
        self._stepped_last: set[Tensor] = set()
        self._stepped_now: set[Tensor] = set()  # by this microbatch's backward so far
        self._step_hooks: list[RemovableHandle] = []

    # -- events ----------------------------------------------------------------------------

    def fit_start(self, state: State, logger: Logger) -> None:
        self._undo(state)  # what an earlier fit of this Trainer that raised left in place
        optimizer = self._check_supported(state)
        _warn_of_windows_left_open(optimizer)
        previous = _callback_of.get(optimizer, lambda: None)()
        if previous is not None and previous is not self:
            # A Trainer whose fit raised, still referenced (a notebook's last traceback),
            # left its hooks on this optimizer: their stale records refused the new fit's
            # first backward as a second one.
            previous._undo(state, restore_monitors=False)
        _callback_of[optimizer] = weakref.ref(self)
        self._optimizer, self._model = optimizer, state.model
        monitors = [
            (i, c) for i, c in enumerate(state.callbacks) if isinstance(c, OptimizerMonitor)
        ]
        if monitors:
            # Inside each release hook, before it frees the gradient: every released
            # parameter, also of a group added later, and only those.
            self._norm_hooks = [optimizer.register_release_pre_hook(self._record_norm)]
        self._monitors = monitors
        for _, monitor in reversed(monitors):
            state.callbacks.remove(monitor)
        # Hooks on the sharded parameters the optimizer holds (FSDP2 swaps in unsharded
        # ones during forward), paused but inside the backward passes that should step:
        # a backward another callback runs between batches must not step.
        self._arm(True)
        optimizer.release_paused = True
        self._step_hooks = [optimizer.register_release_pre_hook(self._note_stepped)]

    def before_train_batch(self, state: State, logger: Logger) -> None:
        self._batch_samples, self._seen_samples = self._count(state.batch, "a batch", state), 0.0
        self._stepping = self._past_last = False
        self._grad_norms.clear()

    def before_forward(self, state: State, logger: Logger) -> None:
        """Decide whether this microbatch's backward steps (the last microbatch holding
        samples on any rank) or folds (optimizer accumulation), from counts summed over
        the ranks so that every rank decides alike."""
        samples = self._count(state.batch, "a microbatch", state)
        if self._past_last and samples > 0:
            raise ValueError(
                f"Invalid get_num_samples_in_batch: its microbatches so far counted "
                f"{self._seen_samples} of the {self._batch_samples} it returned for the whole "
                f"batch (on every rank together), and then a microbatch of {samples} more: "
                "the batch was stepped at the one before, so this one's gradient would be "
                "lost. Allowed: counts that add up, a batch's the sum of its microbatches' "
                "(fractional ones are taken to add up within a millionth of the batch's, "
                "for rounding, so a last microbatch below that share cannot be told)."
            )
        self._seen_samples += samples
        seen, total = self._seen_samples, self._batch_samples
        whole = seen.is_integer() and total.is_integer()
        reached = seen >= (total if whole else total * (1 - _COUNT_TOLERANCE))
        trailing = self._past_last  # after the last microbatch that holds samples
        last = reached and not trailing
        self._past_last = reached
        optimizer = self._optimizer
        assert optimizer is not None
        if self.optimizer_accumulation and not trailing and samples > 0:
            optimizer.optimizer_accumulation = not last
            # Composer scales each microbatch's loss by its share of the batch's samples:
            # v then grows by that share (exact for unequal microbatches too).
            optimizer.microbatch_share = samples
            self._stepping = True
        else:
            # A microbatch without samples has a zero gradient (Composer scales its loss by
            # 0): kept in param.grad before the last, dropped after its backward after it.
            self._stepping = last
        self._recording = last
        self._dropping = trailing
        if last:
            self._stepped_last.clear()

    def before_backward(self, state: State, logger: Logger) -> None:
        """Unpause for the Trainer's backward of a microbatch that steps or folds, as late
        as possible: a backward an Algorithm runs earlier in the microbatch (after forward
        or loss) accumulates as without release."""
        optimizer = self._optimizer
        assert optimizer is not None
        self._stepped_now.clear()
        optimizer.release_paused = not self._stepping

    def after_backward(self, state: State, logger: Logger) -> None:
        optimizer = self._optimizer
        assert optimizer is not None
        optimizer.release_paused = True
        if self._dropping:  # what a microbatch after the step left: zero, by Composer's scale
            for param in self._stepped_last:
                param.grad = None

    def after_train_batch(self, state: State, logger: Logger) -> None:
        """A counter whose microbatches do not add up to its batch never reached the last
        microbatch: with optimizer accumulation nothing stepped (every microbatch folded
        into a window left open), without it nothing was released. Said on every rank
        alike (the counts are summed over the ranks)."""
        if self._past_last:
            return
        what = (
            "every microbatch was folded and none stepped"
            if self.optimizer_accumulation
            else "nothing was released (the optimizer stepped after backward)"
        )
        raise ValueError(
            f"Invalid get_num_samples_in_batch: the batch's microbatches counted "
            f"{self._seen_samples} of the {self._batch_samples} it returned for the whole "
            f"batch (on every rank together), so no microbatch was its last and {what}. "
            "Allowed: counts that add up, a batch's the sum of its microbatches'."
        )

    def batch_end(self, state: State, logger: Logger) -> None:
        for _, monitor in self._monitors:
            self._log_monitor_metrics(monitor, state, logger)

    def fit_end(self, state: State, logger: Logger) -> None:
        self._undo(state)

    def close(self, state: State, logger: Logger) -> None:
        """Composer runs no event when fit raises, only close (trainer.close(), or when the
        Trainer goes away): without this the hooks stayed armed on the model, and a plain
        backward after the failed fit stepped the optimizer and freed every gradient.
        The monitors go back at the next fit_start or fit_end: Composer is iterating over
        state.callbacks here."""
        self._undo(state, restore_monitors=False)

    # -- helpers ---------------------------------------------------------------------------

    def _undo(self, state: State, restore_monitors: bool = True) -> None:
        """Disarm, reset accumulation and remove the norm hooks (and give the monitors
        back): everything fit_start set up, whether the fit ended or raised. The optimizer
        and its release are left alone once another GradientRelease took them over (a new
        Trainer beside a failed one): closing or dropping the failed Trainer then undid the
        running fit's release."""
        if self._owns_optimizer():
            self._arm(False)
            if self._optimizer is not None:
                self._optimizer.optimizer_accumulation = False
                self._optimizer.microbatch_share = None
                self._optimizer.release_paused = False
        for handle in (*self._norm_hooks, *self._step_hooks):
            handle.remove()
        self._norm_hooks.clear()
        self._step_hooks.clear()
        self._stepped_last.clear()
        self._stepped_now.clear()
        if restore_monitors:
            for index, monitor in self._monitors:
                state.callbacks.insert(index, monitor)
            self._monitors.clear()

    def _count(self, batch: Any, what: str, state: State) -> float:
        """Samples in a (micro)batch summed over the ranks, checked alike on every rank (a
        rank refusing alone would leave the others waiting in the all-reduce). Summed
        because Composer scales each rank's loss by its samples over all ranks' and FSDP2
        sums the ranks' gradients: a fold's share of v is its microbatch's samples on every
        rank, and every rank must agree which microbatch is the last. A batch of 0 made
        every microbatch look like the last (a step each), NaN none (gradients kept,
        nothing released), both silently."""
        counted = self._count_samples(batch)
        number = isinstance(counted, numbers.Real) or (
            isinstance(counted, Tensor) and counted.numel() == 1
        )
        samples = float(counted) if number and not isinstance(counted, bool) else math.nan
        valid = math.isfinite(samples) and samples >= 0
        total = samples if valid else math.nan
        if dist.get_world_size() > 1:
            summed = state.device.tensor_to_device(torch.tensor(total, dtype=torch.float64))
            dist.all_reduce(summed, reduce_operation="SUM")
            total = float(summed.item())
        if not math.isfinite(total) or (what == "a batch" and total <= 0):
            returned = f"{counted!r}" if valid else f"{counted!r} on this rank"
            raise ValueError(
                f"Invalid get_num_samples_in_batch: it returned {returned} for {what} "
                f"({total} on every rank together). Allowed: a finite number >= 0 of "
                "samples, > 0 for a batch on every rank together, by which GradientRelease "
                "tells a batch's last microbatch."
            )
        return total

    def _check_supported(self, state: State) -> AdamFamilyOptimizer:
        if sum(isinstance(callback, GradientRelease) for callback in state.callbacks) > 1:
            raise ValueError(
                "Invalid callbacks for GradientRelease: it is given more than once. Allowed: "
                "one GradientRelease per Trainer (each would arm and disarm the same hooks, "
                "with its own optimizer_accumulation)."
            )
        # SAM wraps the optimizer, which would otherwise be refused as a foreign one.
        whole_gradient = [
            type(a).__name__ for a in state.algorithms if isinstance(a, (GradientClipping, SAM))
        ]
        if whole_gradient:
            raise ValueError(
                f"Invalid algorithms for GradientRelease: {whole_gradient}. Gradient clipping "
                "and SAM (which perturbs the weights along the whole gradient, then steps "
                "from a second backward) need every gradient at once, and released gradients "
                "are applied and freed one by one inside backward. Allowed: drop these "
                "algorithms or GradientRelease."
            )
        optimizers = state.optimizers
        optimizer = optimizers[0] if len(optimizers) == 1 else None
        if not isinstance(optimizer, AdamFamilyOptimizer) or not any(
            g["gradient_release"] for g in optimizer.param_groups
        ):
            names = [f"{type(o).__module__}.{type(o).__qualname__}" for o in optimizers]
            raise ValueError(
                f"Invalid optimizers for GradientRelease: {names}. "
                "Allowed: one adamkit optimizer created with gradient_release=True "
                "(e.g. composer_adam.DecoupledAdamW(params, gradient_release=True))."
            )
        if state.auto_microbatching:
            raise ValueError(
                "Invalid device_train_microbatch_size for GradientRelease: 'auto'. After an "
                "out-of-memory error Composer reruns the batch in smaller microbatches, and "
                "what release had stepped (or folded, with optimizer_accumulation) before "
                "it would be stepped again. Allowed: a fixed microbatch size (an int)."
            )
        if state.precision == Precision.AMP_FP16:
            raise ValueError(
                "Invalid precision for GradientRelease: amp_fp16. Its GradScaler unscales and "
                "skips steps after backward, when released parameters are already updated. "
                "Allowed: fp32, amp_bf16 (or turn release off)."
            )
        world_size = dist.get_world_size()
        dtensor = dtensor_type()
        plain = [
            name
            for name, p in state.model.named_parameters()
            if p.requires_grad and (dtensor is None or not isinstance(p, dtensor))
        ]
        if world_size > 1 and plain:
            wrapper = type(state.model).__name__
            raise ValueError(
                f"Invalid parallelism for GradientRelease on {world_size} ranks: {wrapper} "
                f"with plain parameters ({plain[:2]}...). Their hooks would step on each "
                "rank's local gradient before the all-reduce averages it. Allowed: "
                "parallelism_config={'fsdp': FSDP2Config()} (FSDP2 steps each sharded "
                "parameter after its reduce-scatter), one rank, or DDP without "
                "GradientRelease."
            )
        if self.optimizer_accumulation and not optimizer.supports_optimizer_accumulation:
            raise ValueError(
                f"Invalid optimizer_accumulation for {type(optimizer).__name__}: True. "
                "Allowed: False, or an AdamW/RAdam optimizer."
            )
        return optimizer

    def _owns_optimizer(self) -> bool:
        """Whether this callback armed its optimizer last (or none has armed it)."""
        if self._optimizer is None:
            return True
        owner = _callback_of.get(self._optimizer, lambda: None)()
        return owner is None or owner is self

    def _arm(self, armed: bool) -> None:
        """Prepare release of this fit's optimizer on its model (a model another optimizer
        was left prepared on is prepared for this one: it was skipped as armed, and release
        stayed off with a warning), or remove the release this callback made, if it is
        still in place (one made since, by hand or by another callback, is left alone)."""
        optimizer = self._optimizer
        if self._model is None or optimizer is None:
            return
        if armed and not core.is_gradient_release_prepared(self._model, optimizer):
            core.prepare_for_gradient_release(self._model, optimizer)
            self._registration = optimizer.gradient_release_registrations[-1]
        elif not armed:
            if any(r is self._registration for r in optimizer.gradient_release_registrations):
                core.remove_gradient_release(self._model)
            self._registration = None

    def _note_stepped(self, param: Tensor) -> None:
        """Runs just before each released step (or fold) applies: refuses a parameter's
        second one in a microbatch, before it applies (Composer runs Algorithms before
        callbacks at each event, so a backward an Algorithm runs at AFTER_BACKWARD comes
        before this callback pauses release)."""
        if param in self._stepped_now:
            raise RuntimeError(
                "Invalid setup for GradientRelease: a second backward reached a released "
                f"parameter of shape {tuple(param.shape)} in the microbatch whose backward "
                "steps (or folds): an Algorithm or callback running its own backward at "
                "AFTER_BACKWARD, or a callback after GradientRelease at BEFORE_BACKWARD. "
                "It would be stepped twice; it was not. Allowed: such a backward at "
                "AFTER_FORWARD, AFTER_LOSS or BATCH_END, or training without GradientRelease."
            )
        self._stepped_now.add(param)
        if self._recording:
            self._stepped_last.add(param)

    def _record_norm(self, param: Tensor) -> None:
        """Runs just before the release hook; only the last microbatch's norm is kept."""
        if self._recording:
            grad = param.grad
            as_is = torch.linalg.vector_norm(grad)
            widened = grad.dtype in (torch.float16, torch.bfloat16)
            self._grad_norms[param] = (as_is, metrics.l2_norm(grad) if widened else as_is)

    def _log_monitor_metrics(self, monitor: OptimizerMonitor, state: State, logger: Logger) -> None:
        """What OptimizerMonitor logs, with released gradients' norms taken in backward."""
        if state.timestamp.batch.value % monitor.batch_log_interval != 0:
            return
        found: dict[str, Any] = {}
        optimizer = state.optimizers[0]
        # As OptimizerMonitor does: under FSDP the optimizer's metrics are reduced over ranks.
        reduce = state.fsdp_enabled and monitor.log_optimizer_metrics
        for name, p in state.model.named_parameters():
            recorded = self._grad_norms.get(p)
            if (recorded is None and p.grad is None) or not p.requires_grad:
                continue
            if monitor.log_optimizer_metrics:
                optimizer.report_per_parameter_metrics(p, name, found)
            if f"l2_norm/grad/{name}" not in found:
                if p.grad is not None:
                    norm = torch.linalg.vector_norm(p.grad)
                else:  # released: as the run without release would have logged it
                    as_is, widened = recorded  # type: ignore[misc]
                    norm = widened if monitor.log_optimizer_metrics else as_is
                share = rank_share(norm) if reduce else metrics.global_value(norm)
                found[f"l2_norm/grad/{name}"] = share
        if reduce:
            found = optimizer.dist_reduce_metrics(optimizer.pre_reduce_metrics(found))
        # Summed as OptimizerMonitor sums them (in the norms' own dtype, in this order), so
        # the global norm is the ordinary run's to the last bit.
        squares: Any = 0.0
        for key, value in found.items():
            if key.startswith("l2_norm/grad/"):
                squares += value**2
        found["l2_norm/grad/global"] = squares**0.5
        logger.log_metrics({k: float(v) for k, v in found.items()})
