"""Lightning callbacks: gradient release and optimizer metrics for an adamkit optimizer.

The math is core's (core.gradient_release, optimizer accumulation, core.metrics); this
file only decides when Lightning is ready for it and keeps it in step with Lightning's loop.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.strategies import (
    DDPStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import core
from core import metrics
from core.models import user_facing_name
from core.optimizer import require_core_optimizer, step_released_param
from lightning_adam.optimizers import public_path


class GradientRelease(L.Callback):
    """Step each parameter inside backward and free its gradient: Lightning's gradient release.

    Add it to the Trainer's callbacks; the optimizer must be one adamkit core optimizer
    (gradient_release need not be set: the callback turns it on for every group).
    Settings that cannot work are refused in `setup`, before the optimizer is built;
    release is switched on in `on_fit_start`, after Lightning has built the optimizer,
    converted the precision and wrapped the model, and before a checkpoint's optimizer
    state is loaded (per-parameter steps read the live param groups, so LR schedulers,
    LearningRateMonitor and checkpoints work unchanged).

    - accumulate_grad_batches > 1 (one process): micro-batches are folded into the
      moments with core's optimizer accumulation (Adam, AdamW, RAdam; m exact, v with
      the micro-batches' variance, see the README); NAdam and ADOPT are refused (L2
      decay is not: core adds it once per window). The window is read at every batch,
      so a GradientAccumulationScheduler's changes are followed (and its largest window
      is checked at fit start).
    - DDP: each bucket's parameters are stepped from a DDP communication hook, after that
      bucket's all-reduce, so every replica applies the averaged gradient and the result
      equals DDP without release. Gradients stay in DDP's buckets, so this saves no memory
      there; under DDP, accumulate_grad_batches > 1 is exact (DDP skips the all-reduce
      until the last micro-batch). find_unused_parameters=True is refused.
    - ModelParallelStrategy: FSDP2 reduce-scatters each gradient and then runs the sharded
      parameter's post-accumulate-grad hooks, and tensor-parallel DTensor parameters get
      their global gradient from autograd, so core's hooks step every shard with the
      right gradient and free it: equal to training without release, and no rank holds
      a gradient at the end of backward. FSDP2 reduce-scatters every micro-batch, so
      accumulate_grad_batches > 1 folds each averaged micro-batch into the moments, as
      on one process. Every trainable parameter must be a DTensor (fully_shard or
      parallelize_module in configure_model); a plain one is refused.
    - Refused: gradient clipping (the gradient is applied and freed inside backward;
      ADOPT's own clip=True bounds its update without it), 16-mixed precision (its
      GradScaler unscales and skips steps after backward; use bf16-mixed or bf16-true),
      manual optimization, and strategies other than single-device, DDP and
      ModelParallelStrategy (FSDPStrategy, DeepSpeed: use ModelParallelStrategy).
    """

    def __init__(self) -> None:
        self._reset()
        self._windows_to_reopen: dict[str, int] = {}

    # -- open accumulation windows in checkpoints ----------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The open windows by parameter name, beside the optimizer's own state: under
        ModelParallelStrategy torch.distributed.checkpoint loads only the state keys a
        fresh optimizer has, so a fit stopped inside a window (should_stop, max_time)
        lost the window's count there and restarted it on resuming."""
        if self._optimizer is None or self._module is None:
            return {}
        names = {param: name for name, param in self._module.named_parameters()}
        windows = self._optimizer.open_windows()
        return {"open_windows": {names[p]: count for p, count in windows.items() if p in names}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._windows_to_reopen = dict(state_dict.get("open_windows", {}))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Reopen the checkpoint's windows its optimizer state lost (Lightning has loaded
        both by now); where the optimizer's own state holds them, nothing changes."""
        pending, self._windows_to_reopen = self._windows_to_reopen, {}
        if not pending or self._optimizer is None:
            return
        params = dict(pl_module.named_parameters())
        unknown = sorted(set(pending) - set(params))
        if unknown:
            raise ValueError(
                f"Invalid checkpoint for GradientRelease: open accumulation windows of "
                f"parameters {unknown}, which {type(pl_module).__name__} does not have. "
                "Allowed: a checkpoint of this model."
            )
        state = self._optimizer.state
        lost = {
            params[name]: count
            for name, count in pending.items()
            if "window_microbatches" not in state.get(params[name], {})
        }
        self._optimizer.reopen_windows(lost)

    def _reset(self) -> None:
        self._optimizer: core.AdamFamilyOptimizer | None = None
        self._default_release = False  # the optimizer's own default, restored at teardown
        self._group_release: list[tuple[dict[str, Any], Any]] = []  # restored if fit fails
        self._step_hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._in_step = False  # inside the optimizer's step(closure): Lightning's own step
        self._released: set[torch.Tensor] = set()
        self._module: torch.nn.Module | None = None
        self._local = False  # released by core's hooks (not from DDP's communication hook)
        self._accumulates = False  # this batch is in a window of more than one micro-batch
        self._steps_before_batch = 0
        self._released_now: set[torch.Tensor] = set()  # by this backward so far

    # -- checks, before Lightning builds anything --------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning restores callbacks after setup, for every stage: windows a validate,
        # test or predict with ckpt_path restored are not this run's (a later fit without
        # ckpt_path reopened them on its own optimizer); a resumed fit restores its own.
        self._windows_to_reopen = {}
        if stage != "fit":
            return
        if trainer.gradient_clip_val:
            raise ValueError(
                f"Invalid gradient_clip_val for GradientRelease: {trainer.gradient_clip_val!r}. "
                "Allowed: None or 0. Release applies and frees each gradient inside backward, "
                "so there is no whole gradient left to clip; drop gradient_clip_val, or drop "
                "GradientRelease to clip (ADOPT's clip=True bounds its update without it)."
            )
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                f"Invalid precision for GradientRelease: {trainer.precision!r}. Allowed: "
                "'32-true', 'bf16-mixed', 'bf16-true' (or '64-true'). Its GradScaler unscales "
                "gradients and skips inf/NaN steps after backward, when released parameters "
                "are already updated; bf16 needs no scaler."
            )
        if sum(isinstance(callback, GradientRelease) for callback in trainer.callbacks) > 1:
            raise ValueError(
                "Invalid callbacks for GradientRelease: it is given more than once. Allowed: "
                "one GradientRelease per Trainer (a second one hooked every parameter again)."
            )
        if is_overridden("configure_gradient_clipping", pl_module):
            raise ValueError(
                f"Invalid {type(pl_module).__name__}.configure_gradient_clipping for "
                "GradientRelease: overridden. Allowed: Lightning's own (which clips nothing "
                "without gradient_clip_val). Release applies and frees each gradient inside "
                "backward, before any clipping could run; drop the override, or drop "
                "GradientRelease to clip."
            )
        if not pl_module.automatic_optimization:
            raise ValueError(
                "Invalid automatic_optimization for GradientRelease: False. Allowed: True. "
                "With manual optimization on one process or under ModelParallelStrategy "
                "(FSDP2), call core.prepare_for_gradient_release(self, self.optimizers()) "
                "in on_fit_start and set optimizer_accumulation in training_step yourself; "
                "under DDP, release needs this callback's communication hook, so train "
                "without release there."
            )
        if type(trainer.strategy) not in (SingleDeviceStrategy, DDPStrategy, ModelParallelStrategy):
            raise ValueError(
                f"Invalid strategy for GradientRelease: {type(trainer.strategy).__name__}. "
                "Allowed: SingleDeviceStrategy, DDPStrategy ('auto' on one device, 'ddp', "
                "'ddp_spawn') or ModelParallelStrategy (FSDP2 with fully_shard in "
                "configure_model, which also replaces FSDPStrategy)."
            )

    # -- switching release on and off ---------------------------------------------------------

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        optimizer = _single_core_optimizer(trainer.optimizers)
        if isinstance(trainer.strategy, ModelParallelStrategy):
            _check_sharded(pl_module)
        wrapped = trainer.strategy.model
        if not isinstance(wrapped, DistributedDataParallel):
            schedules = [
                callback
                for callback in trainer.callbacks
                if isinstance(callback, GradientAccumulationScheduler)
            ]
            largest = max(
                [trainer.accumulate_grad_batches]
                + [max(schedule.scheduling.values()) for schedule in schedules]
            )
            if largest > 1:
                _check_optimizer_accumulation(optimizer, largest)
        # From here on, a refusal (foreign hooks, a DDP comm hook) is undone by on_exception.
        self._optimizer = optimizer
        self._group_release = [(g, g["gradient_release"]) for g in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["gradient_release"] = True
        # A group added mid-fit (BackboneFinetuning's add_param_group) is released too.
        self._default_release = optimizer.defaults.get("gradient_release", False)
        optimizer.defaults["gradient_release"] = True
        self._step_hooks = [
            optimizer.register_step_pre_hook(self._entering_step),
            optimizer.register_step_post_hook(self._leaving_step),
        ]
        if isinstance(wrapped, DistributedDataParallel):
            self._released = _step_after_all_reduce(wrapped, optimizer)
        else:
            core.prepare_for_gradient_release(pl_module, optimizer)  # refuses foreign hooks
            # Paused but inside Lightning's backward passes: a backward some callback runs
            # (a gradient probe, then zero_grad) must not step.
            optimizer.release_paused = True
            self._step_hooks.append(optimizer.register_release_pre_hook(self._note_released))
            for monitor in trainer.callbacks:
                if isinstance(monitor, OptimizerMonitor):
                    monitor.record_gradient_norms_in_backward(optimizer)
            self._module, self._local = pl_module, True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._module is not None:
            core.remove_gradient_release(self._module)
        for handle in self._step_hooks:
            handle.remove()
        if self._optimizer is not None:
            self._optimizer.released_params.difference_update(self._released)
            self._optimizer.optimizer_accumulation = False
            self._optimizer.release_paused = False
            self._optimizer.defaults["gradient_release"] = self._default_release
        self._reset()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # Lightning calls no teardown when fit raises (or is interrupted): without this the
        # hooks stayed on the module and a later fit of it stepped the old optimizer too;
        # the groups get back the setting they had (a fit that ends well keeps them on).
        for group, setting in self._group_release:
            group["gradient_release"] = setting
        self.teardown(trainer, pl_module, "fit")

    # -- backward inside Lightning's optimizer step --------------------------------------------

    def _entering_step(self, *args: Any) -> None:
        self._in_step = True

    def _leaving_step(self, *args: Any) -> None:
        self._in_step = False

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        """Release runs inside Lightning's own backward passes only (paused after each).
        On a batch Lightning steps, backward runs inside optimizer.step(closure). An
        optimizer_step override that runs the closure without stepping (to skip a batch)
        would still have its update applied by release inside backward: refused here,
        before backward changes anything."""
        if self._optimizer is None:
            return
        if self._in_step or _lightning_will_accumulate(trainer):
            self._released_now.clear()
            self._optimizer.release_paused = False
            return
        raise RuntimeError(
            f"Invalid {type(pl_module).__name__}.optimizer_step for GradientRelease: backward "
            "ran outside optimizer.step on a batch Lightning steps (the closure was called "
            "directly, as an override that skips batches does). Release applies each update "
            "inside backward, so it could not be skipped; nothing was updated. Allowed: an "
            "optimizer_step that calls optimizer.step(closure=optimizer_closure), or drop "
            "GradientRelease."
        )

    def _note_released(self, param: torch.Tensor) -> None:
        """Runs just before each released step (or fold): refuses a parameter's second one
        in one of Lightning's backward passes, before it applies."""
        if param in self._released_now:
            raise RuntimeError(
                "Invalid setup for GradientRelease: a second backward reached a released "
                f"parameter of shape {tuple(param.shape)} while release was on for "
                "Lightning's backward (an on_before_backward after GradientRelease's, the "
                "LightningModule's included, or an on_after_backward before it, running a "
                "backward of its own). It would be stepped twice; it was not. Allowed: such "
                "a backward in training_step, before the loss is returned (it accumulates "
                "into the step), or outside the training step (on_train_batch_end)."
            )
        self._released_now.add(param)

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._optimizer is not None:
            self._optimizer.release_paused = True

    # -- accumulation windows, in step with Lightning's own decision --------------------------

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._in_step = False  # a step that raised never reached its post hook
        # Read every batch: a GradientAccumulationScheduler changes it at epoch starts.
        self._accumulates = self._local and trainer.accumulate_grad_batches > 1
        if self._accumulates and self._optimizer is not None:
            self._optimizer.optimizer_accumulation = _lightning_will_accumulate(trainer)
            self._steps_before_batch = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if not (self._accumulates and self._optimizer is not None):
            return
        folded = self._optimizer.optimizer_accumulation
        stepped = trainer.global_step != self._steps_before_batch
        self._optimizer.optimizer_accumulation = False
        if folded == stepped:
            raise RuntimeError(
                f"GradientRelease lost step with Lightning's accumulation at step "
                f"{trainer.global_step}: "
                f"it {'folded' if folded else 'updated'} in backward but Lightning "
                f"{'stepped' if stepped else 'did not step'} the optimizer."
            )


def _check_sharded(module: L.LightningModule) -> None:
    """Under ModelParallelStrategy every trainable parameter must be a DTensor: a plain one
    gets its hook on the local gradient, before any reduction (core refuses it too, but
    only after the optimizer's groups were switched to release)."""
    plain = [
        name
        for name, param in module.named_parameters()
        if param.requires_grad and not isinstance(param, DTensor)
    ]
    if plain:
        raise ValueError(
            "Invalid model for GradientRelease under ModelParallelStrategy: "
            f"{len(plain)} parameter(s) not sharded ({', '.join(plain[:3])}). Allowed: every "
            "trainable parameter a DTensor, by fully_shard or parallelize_module in "
            "configure_model (a plain parameter's hook sees its local gradient before any "
            "reduction); or drop GradientRelease."
        )


def _single_core_optimizer(optimizers: list[torch.optim.Optimizer]) -> core.AdamFamilyOptimizer:
    names = [public_path(type(o)) for o in optimizers]
    if len(optimizers) != 1 or not isinstance(optimizers[0], core.AdamFamilyOptimizer):
        raise TypeError(
            f"Invalid optimizers for GradientRelease: {names}. Allowed: exactly one adamkit "
            "core optimizer (core.Adam, AdamW, RAdam, NAdam or ADOPT)."
        )
    return optimizers[0]


def _check_optimizer_accumulation(optimizer: core.AdamFamilyOptimizer, windows: int) -> None:
    """Refuse algorithms whose update needs the accumulated gradient itself, which core's
    optimizer accumulation does not keep (it folds micro-batches into the moments)."""
    name = type(optimizer).__name__
    if not optimizer.supports_optimizer_accumulation:
        raise ValueError(
            f"Invalid accumulate_grad_batches for GradientRelease with {name}: {windows}. "
            "Allowed: 1, or use Adam, AdamW or RAdam, whose optimizer accumulation folds "
            f"micro-batches into the moments ({name}'s update needs the whole accumulated "
            "gradient)."
        )


def _step_counts(optimizer: torch.optim.Optimizer) -> dict[torch.Tensor, float]:
    """Each stepped parameter's step count (a host scalar in core's state): one that moved
    during a batch was updated by it."""
    if not isinstance(optimizer, core.AdamFamilyOptimizer):
        return {}
    return {p: float(s["step"]) for p, s in optimizer.state.items() if "step" in s}


def _logged_batches(trainer: L.Trainer) -> int:
    """Batches that stepped before this one: Lightning's step axis for logged metrics
    (optimizer steps with one optimizer under automatic optimization; every batch under
    manual optimization, where training_step steps as often as it likes)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def _lightning_will_accumulate(trainer: L.Trainer) -> bool:
    """Whether Lightning will skip the optimizer step after this batch (its own rule)."""
    return trainer.fit_loop.epoch_loop._should_accumulate()


def _step_after_all_reduce(
    ddp: DistributedDataParallel, optimizer: core.AdamFamilyOptimizer
) -> set[torch.Tensor]:
    """Register a comm hook that all-reduces each bucket, then steps its parameters.

    The full step Lightning takes after backward skips what they stepped (the optimizer
    records each step_released_param); they go in optimizer.released_params, which says
    release is in use. Returns them, for teardown.
    """
    if ddp.find_unused_parameters:
        raise ValueError(
            "Invalid find_unused_parameters for GradientRelease under DDP: True. Allowed: False. "
            "A parameter unused on one rank has no local gradient there, so its bucket step "
            "could not tell a globally unused parameter from one another rank used."
        )
    in_optimizer = {p for group in optimizer.param_groups for p in group["params"]}
    released = {p for p in ddp.module.parameters() if p.requires_grad and p in in_optimizer}
    process_group = ddp.process_group
    world_size = dist.get_world_size(process_group)

    # No annotations: DDP checks them against dist.GradBucket, and this module's are strings.
    def all_reduce_then_step(state, bucket):  # type: ignore[no-untyped-def]
        buffer = bucket.buffer()
        buffer.div_(world_size)
        reduced = dist.all_reduce(buffer, group=process_group, async_op=True).get_future()

        def step(done: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
            for param, averaged in zip(bucket.parameters(), bucket.gradients(), strict=True):
                if param in released and param.grad is not None:
                    param.grad.copy_(averaged)
                    step_released_param(optimizer, param)
            return done.value()[0]

        return reduced.then(step)

    try:
        ddp.register_comm_hook(None, all_reduce_then_step)
    except RuntimeError as error:
        raise ValueError(
            "Invalid DDP setup for GradientRelease: the model already has a communication "
            "hook (DDPStrategy(ddp_comm_hook=...)), and DDP takes only one. Allowed: no "
            "ddp_comm_hook; GradientRelease registers its own to step after the all-reduce."
        ) from error
    optimizer.released_params.update(released)
    return released


class OptimizerMonitor(L.Callback):
    """Log l2 norms of each parameter's moment, update, value and gradient, and their global
    norms, under Composer's OptimizerMonitor names, through the trainer's loggers.

    Keys: `l2_norm/{moment,param,update,grad}/<parameter name>` and
    `l2_norm/{moment,param,update,grad}/global` (the root of the summed squares). The
    values come from core.metrics (shared with the Composer adapter) at batch end, the
    gradient norms and lrs just after the batch's last optimizer step, so the update norm
    is the step just applied. They are logged on Lightning's cadence and step index for
    that batch's metrics (batches that step: not accumulating micro-batches; every batch
    under manual optimization), and only on global rank zero (DDP replicas agree).

    With GradientRelease the gradient is gone by batch end, so its norm is taken inside
    backward, just before release frees it (with accumulate_grad_batches > 1 that is the
    last micro-batch's gradient, the one stepped with); NAdam's update norm, which needs
    the gradient itself, is then not logged. With an optimizer that is not an adamkit
    one, only the param and grad norms are logged.

    Under ModelParallelStrategy parameters, gradients and state are DTensor shards: every
    rank computes the norms (each a reduction over ranks, taken in the same order
    everywhere) and rank zero logs the global values. Refused under FSDPStrategy (FSDP1,
    GPU only), whose flat local shards this callback cannot see whole, and with more than
    one optimizer (manual optimization): it reads one optimizer's moments.

    Args:
        every_n_steps: Log every this many batches that step (optimizer steps under
            automatic optimization); None uses the Trainer's log_every_n_steps.
        per_parameter: Log each parameter's norms; False logs only the global ones.
    """

    def __init__(self, every_n_steps: int | None = None, per_parameter: bool = True) -> None:
        if every_n_steps is not None and (
            not isinstance(every_n_steps, int)
            or isinstance(every_n_steps, bool)
            or every_n_steps < 1
        ):
            raise ValueError(
                f"Invalid every_n_steps: {every_n_steps!r}. Allowed: None or an int >= 1."
            )
        if not isinstance(per_parameter, bool):
            raise ValueError(f"Invalid per_parameter: {per_parameter!r}. Allowed: True or False.")
        self.every_n_steps, self.per_parameter = every_n_steps, per_parameter
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._grad_norms: dict[torch.Tensor, torch.Tensor] = {}
        self._recording = False
        self._steps_before_batch = 0
        self._step_lrs: list[Any] = []
        self._counts_before_batch: dict[torch.Tensor, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if isinstance(trainer.strategy, FSDPStrategy):
            raise ValueError(
                f"Invalid strategy for OptimizerMonitor: {type(trainer.strategy).__name__}. "
                "Allowed: single-device, DDP ('auto', 'ddp', 'ddp_spawn') or "
                "ModelParallelStrategy (FSDP2, whose DTensor norms every rank computes "
                "together); FSDPStrategy's flat shards are not seen whole here."
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if len(trainer.optimizers) > 1:
            names = [public_path(type(optimizer)) for optimizer in trainer.optimizers]
            raise ValueError(
                f"Invalid optimizers for OptimizerMonitor: {len(names)} ({names}). Allowed: "
                "one, whose moments and updates it logs; with several (manual "
                "optimization), log core.metrics.parameter_metrics(optimizer, param, name, "
                "metrics) for each from training_step instead."
            )
        if trainer.optimizers:
            # After each step (inside it, Lightning's closure runs backward): the gradients
            # and lrs that step used, also when training_step zeroes the gradients after
            # opt.step() or steps a scheduler by hand (manual optimization).
            self._hooks.append(trainer.optimizers[0].register_step_post_hook(self._after_step))

    def record_gradient_norms_in_backward(self, optimizer: core.AdamFamilyOptimizer) -> None:
        """Take each released gradient's norm just before release frees it (GradientRelease
        calls this): the optimizer's released parameters only, those of groups added
        later (BackboneFinetuning) included, as the norms of an ordinary step are."""
        require_core_optimizer(optimizer, ") whose released gradients are recorded")
        self._hooks.append(optimizer.register_release_pre_hook(self._record))

    def _record(self, param: torch.Tensor) -> None:
        if self._recording and param.grad is not None:
            self._grad_norms[param] = metrics.l2_norm(param.grad)

    def _after_step(self, optimizer: torch.optim.Optimizer, *args: Any) -> None:
        if not self._recording:
            return
        self._step_lrs = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:  # released ones were recorded inside backward
                    self._grad_norms[param] = metrics.l2_norm(param.grad)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._steps_before_batch = trainer.global_step
        every = self.every_n_steps or trainer.log_every_n_steps  # Lightning's 0: never
        steps = not _lightning_will_accumulate(trainer)
        # Lightning's own cadence and step axis for a batch's metrics: batches that step,
        # which is every batch under manual optimization, however often it steps.
        self._recording = steps and every > 0 and (_logged_batches(trainer) + 1) % every == 0
        self._grad_norms.clear()
        self._counts_before_batch = (
            _step_counts(trainer.optimizers[0]) if self._recording and trainer.optimizers else {}
        )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        stepped = trainer.global_step != self._steps_before_batch
        # Sharded parameters' norms are reductions over ranks: every rank takes part.
        sharded = isinstance(trainer.strategy, ModelParallelStrategy)
        if not (self._recording and stepped and (sharded or trainer.is_global_zero)):
            return
        optimizer = trainer.optimizers[0]
        step_lrs = {
            param: lr
            for group, lr in zip(optimizer.param_groups, self._step_lrs, strict=False)
            for param in group["params"]
        }
        found: dict[str, Any] = {}
        counts_now = _step_counts(optimizer)
        for raw_name, param in pl_module.named_parameters():
            if not param.requires_grad:
                continue
            name = user_facing_name(raw_name)  # the same keys with a submodule compiled
            if isinstance(optimizer, core.AdamFamilyOptimizer):
                lr = step_lrs.get(param)
                # Only what this batch's step updated has an update to show (a parameter
                # without a gradient, or a batch training_step skipped, kept the last one).
                updated = counts_now.get(param, 0.0) != self._counts_before_batch.get(param, 0.0)
                # the gradient's norm is the step's, taken after it (_after_step)
                metrics.parameter_metrics(
                    optimizer, param, name, found, lr=lr, gradient=False, update=updated
                )
            else:  # moment and update norms need a core optimizer's step coefficients
                found[f"{metrics.PARAM}/{name}"] = metrics.l2_norm(param.detach())
            if param in self._grad_norms:
                found[f"{metrics.GRAD}/{name}"] = self._grad_norms[param]
        # In insertion order, the same on every rank: DTensor norms are collectives (one
        # per kind of norm, all parameters' together).
        whole = metrics.global_values(list(found.values()))
        values = {key: float(value) for key, value in zip(found, whole, strict=True)}
        if not trainer.is_global_zero:
            self._grad_norms.clear()
            return
        for metric in metrics.METRICS:
            squares = [v * v for k, v in values.items() if k.startswith(f"{metric}/")]
            if squares:
                values[f"{metric}/global"] = sum(squares) ** 0.5
        if not self.per_parameter:
            values = {k: v for k, v in values.items() if k.endswith("/global")}
        # Where Lightning logs the batch's own metrics (before it counts the batch).
        for logger in trainer.loggers:
            logger.log_metrics(values, step=_logged_batches(trainer))
        self._grad_norms.clear()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._grad_norms.clear()
        self._recording = False

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self.teardown(trainer, pl_module, "fit")  # Lightning tears nothing down after a raise
