"""core.metrics: the update norm is the change the last step made, for every case."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

import core
from core import metrics
from tests.core.cases import (
    LR,
    TRAINING_BACKENDS,
    Case,
    make_batches,
    make_model,
    one_case_per_algorithm,
    train,
    trajectory_cases,
)
from tests.processes import free_port, gloo_group


def _last_step_change(case: Case, dtype: torch.dtype, steps: int = 8) -> tuple:
    """Train with a constant lr; return (model, optimizer, θ before the last step)."""
    model = make_model(dtype)
    optimizer = case.make(model.parameters())
    batches = make_batches(dtype, steps)
    for x, y in batches[:-1]:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batches[-1]
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()
    return model, optimizer, before


@pytest.mark.parametrize("case", trajectory_cases(), ids=lambda c: c.id)
def test_update_is_the_change_the_last_step_made(case: Case) -> None:
    """Exact with every decay mode: decoupled decay shrinks the current θ in the
    recomputation, and the decay factor f it multiplies the update by is divided out
    (it was (1 − f) of the change off); NAdam's gradient term with L2 reads g + λθ at the
    new θ, off by a factor 1 + c elementwise that is divided out too (it was up to 5%
    here, +10% at a first step with small gradients)."""
    model, optimizer, before = _last_step_change(case, torch.float64)
    for p, old in zip(model.parameters(), before, strict=True):
        update, change = metrics.parameter_update(optimizer, p), p.detach() - old
        torch.testing.assert_close(update, change, rtol=1e-9, atol=1e-15)
        assert torch.any(update != 0)


@pytest.mark.parametrize("weight_decay", [0.1, 1.0])
def test_nadams_update_with_l2_is_the_change_where_the_gradient_is_small(
    weight_decay: float,
) -> None:
    """Gradients of 1e-3 beside λθ of 1e-1: g + λθ nearly cancels in places, d is small
    there, and the recomputed gradient term's λ·Δ was +10% of the first step's change
    (2-3% later), not the 1.5e-3 the README said."""
    torch.manual_seed(0)
    param = nn.Parameter(torch.randn(64, 64, dtype=torch.float64))
    optimizer = core.NAdam([param], lr=1e-2, weight_decay=weight_decay)
    for _ in range(4):
        before = param.detach().clone()
        param.grad = 1e-3 * torch.randn_like(param)
        optimizer.step()
        update, change = metrics.parameter_update(optimizer, param), param.detach() - before
        torch.testing.assert_close(update, change, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("decay", ["decoupled", "fully decoupled"])
@pytest.mark.parametrize("name", ["AdamW", "RAdam", "ADOPT"])
def test_update_is_exact_at_a_large_decay(name: str, decay: str) -> None:
    """At weight_decay·lr = 0.05 per step the old update was 5% short (Composer's own
    DecoupledAdamW metric too): now it is the change, as a dashboard expects."""
    torch.manual_seed(0)
    param = nn.Parameter(torch.randn(32, 16, dtype=torch.float64))
    options = {"decouple_wd": True} if decay == "decoupled" else {"decouple_lr": True}
    optimizer = getattr(core, name)([param], lr=0.5, weight_decay=0.1, **options)
    for _ in range(3):
        before = param.detach().clone()
        param.grad = torch.randn_like(param)
        optimizer.step()
    factor = optimizer.last_step_coefficients(param).param_decay
    assert factor == pytest.approx(0.95 if decay == "decoupled" else 0.9)
    update, change = metrics.parameter_update(optimizer, param), param.detach() - before
    torch.testing.assert_close(update, change, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
@pytest.mark.parametrize("case", one_case_per_algorithm(), ids=lambda c: c.id)
def test_update_with_8bit_state_is_the_change_within_its_rounding(case: Case, backend: str) -> None:
    """With 8-bit state the update is rebuilt from the stored moments, which the step
    rounded to their codes after using them: measured 0.9-1.2% of the change elementwise
    (as a vector norm) and 0.02-0.2% in its norm, the number the monitors log (AMSGrad's
    the most: its v_max is rounded to nearest). The moment
    norm is the stored (dequantized) moment's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 3))
    optimizer = case.make(model.parameters(), state_precision="8bit", **TRAINING_BACKENDS[backend])
    weight = model[0].weight
    for _ in range(8):
        before = weight.detach().double().clone()
        optimizer.zero_grad()
        model(torch.randn(16, 64)).square().mean().backward()
        optimizer.step()
    assert "exp_avg_codes" in optimizer.state[weight]
    update, change = metrics.parameter_update(optimizer, weight), weight.detach().double() - before
    assert update is not None  # NAdam's Nesterov term reads the gradient, still held here
    assert float((update - change).norm()) < 0.02 * float(change.norm())
    assert float(update.norm()) == pytest.approx(float(change.norm()), rel=5e-3)
    found: dict = {}
    metrics.parameter_metrics(optimizer, weight, "w", found)
    stored = core.quantization.stored_moment(optimizer.state[weight], "exp_avg", weight)
    assert float(found["l2_norm/moment/w"]) == pytest.approx(float(stored.norm()), rel=1e-6)


@pytest.mark.parametrize("case", one_case_per_algorithm(), ids=lambda c: c.id)
def test_parameter_metrics_names_and_values(case: Case) -> None:
    model, optimizer, before = _last_step_change(case, torch.float32)
    found: dict = {}
    for (name, p), old in zip(model.named_parameters(), before, strict=True):
        metrics.parameter_metrics(optimizer, p, name, found)
        state = optimizer.state[p]
        assert float(found[f"l2_norm/moment/{name}"]) == pytest.approx(
            float(state["exp_avg"].norm()), rel=1e-6
        )
        assert float(found[f"l2_norm/param/{name}"]) == pytest.approx(
            float(p.detach().norm()), rel=1e-6
        )
        assert float(found[f"l2_norm/grad/{name}"]) == pytest.approx(float(p.grad.norm()), rel=1e-6)
        # Decay acts on the new θ (1e-3 off), and float32 θ_new − θ_old loses digits.
        change = (p.detach().double() - old.double()).norm()
        assert float(found[f"l2_norm/update/{name}"]) == pytest.approx(float(change), rel=3e-3)
    assert len(found) == 4 * len(list(model.parameters()))


def test_no_state_no_metrics_and_lr_zero_update_is_zero() -> None:
    model = make_model()
    optimizer = core.AdamW(model.parameters(), lr=LR)
    assert metrics.parameter_metrics(optimizer, next(model.parameters()), "w") == {}
    train(model, optimizer, make_batches(torch.float32, 2))
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    for p in model.parameters():
        assert torch.count_nonzero(metrics.parameter_update(optimizer, p)) == 0


def test_the_first_accumulation_window_reports_nothing_until_it_closes() -> None:
    """A window still open on the first step has state (its partial sums) but no step
    yet: like a parameter without state it contributes nothing, as in Composer."""
    param = nn.Parameter(torch.ones(8))
    optimizer = core.Adam([param], lr=LR)
    optimizer.optimizer_accumulation = True
    param.grad = torch.ones(8)
    optimizer.step()
    assert optimizer.state[param]
    assert metrics.parameter_metrics(optimizer, param, "w") == {}
    optimizer.optimizer_accumulation = False
    optimizer.step()
    assert set(metrics.parameter_metrics(optimizer, param, "w")) >= {"l2_norm/update/w"}


def test_adopts_first_call_updates_nothing_with_decoupled_decay_too() -> None:
    """ADOPT's first call only seeds v (no decay either): its update metric is 0, and
    the second call's is the change it made."""
    param = nn.Parameter(torch.ones(16, dtype=torch.float64))
    optimizer = core.ADOPT([param], lr=1e-2, weight_decay=0.1, decouple_wd=True)
    for call in range(2):
        before = param.detach().clone()
        param.grad = torch.full_like(param, 0.5)
        optimizer.step()
        change = param.detach() - before
        assert bool(change.any()) == (call == 1)
        torch.testing.assert_close(
            metrics.parameter_update(optimizer, param), change, atol=1e-15, rtol=1e-9
        )


def test_a_parameter_taken_out_of_the_groups_reports_all_but_its_update() -> None:
    """A freezing callback that drops a layer's param group leaves its state (and its
    gradient): the metrics raised "in none of this optimizer's param groups", ending a
    Composer run inside OptimizerMonitor. Its update needs the group's hyperparameters."""
    model = make_model()
    *body, head_weight, head_bias = model.parameters()
    optimizer = core.AdamW([{"params": body}, {"params": [head_weight, head_bias]}], lr=LR)
    train(model, optimizer, make_batches(torch.float32, 2))
    del optimizer.param_groups[1]
    nn.functional.mse_loss(model(torch.ones(2, 6)), torch.zeros(2, 3)).backward()
    found = metrics.parameter_metrics(optimizer, head_weight, "head")
    assert sorted(found) == ["l2_norm/grad/head", "l2_norm/moment/head", "l2_norm/param/head"]
    assert float(found["l2_norm/moment/head"]) == pytest.approx(
        float(optimizer.state[head_weight]["exp_avg"].norm()), rel=1e-6
    )
    assert optimizer.last_step_coefficients(head_weight) is None
    assert len(metrics.parameter_metrics(optimizer, body[0], "body")) == 4


def test_metrics_leave_the_optimizer_untouched() -> None:
    model, optimizer, _ = _last_step_change(one_case_per_algorithm()[0], torch.float32)
    saved = {k: {n: v.clone() for n, v in s.items()} for k, s in optimizer.state.items()}
    for name, p in model.named_parameters():
        metrics.parameter_metrics(optimizer, p, name)
    for p, state in optimizer.state.items():
        for key, value in state.items():
            assert torch.equal(value, saved[p][key])


def test_pre_reduce_then_reduce_without_a_process_group_is_the_identity() -> None:
    found = {"l2_norm/update/w": torch.tensor(3.0), "other": torch.tensor(2.0)}
    metrics.dist_reduce_metrics(metrics.pre_reduce_metrics(found))
    assert float(found["l2_norm/update/w"]) == 3.0 and float(found["other"]) == 2.0


def _reduce_on_two_ranks(rank: int, port: int, results: dict) -> None:
    with gloo_group(port, rank, world_size=2):
        # Rank 1 holds no shard of "b": it must still take part, counting zero.
        found = {"l2_norm/grad/a": torch.tensor([3.0, 4.0][rank]), "cosine/x": torch.tensor(1.0)}
        if rank == 0:
            found["l2_norm/moment/b"] = torch.tensor(2.0)
        metrics.dist_reduce_metrics(metrics.pre_reduce_metrics(found))
        results[rank] = {k: float(v) for k, v in found.items()}
        results[f"together {rank}"] = _global_values_together()


def _global_values_together() -> tuple[bool, int, int]:
    """DTensor norms of several kinds (sharded fp32, sharded from bf16, replicated, a
    vector, one with a graph) among plain values: whether global_values gives global_value's
    values bit for bit (and requires_grad alike), and the DTensor.full_tensor calls each
    took (a collective for each Shard)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    generator = torch.Generator().manual_seed(0)

    def norm(shape: tuple[int, ...], placement: object, dtype: torch.dtype) -> torch.Tensor:
        whole = torch.randn(shape, generator=generator).to(dtype)
        return metrics.l2_norm(distribute_tensor(whole, mesh, [placement]))

    values = [
        norm((7, 3), Shard(0), torch.float32),
        torch.tensor(2.0),
        norm((5,), Shard(0), torch.bfloat16),
        norm((6,), Replicate(), torch.float32),
        norm((4, 4), Shard(0), torch.float32),
        distribute_tensor(torch.arange(4.0), mesh, [Shard(0)]),  # not a norm: whole alone
        3.5,
        norm((3,), Replicate(), torch.float32),
        metrics.l2_norm(distribute_tensor(torch.ones(4, 2, requires_grad=True), mesh, [Shard(0)])),
    ]
    calls = [0]
    full_tensor = DTensor.full_tensor

    def counted(self: DTensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls[0] += 1
        return full_tensor(self, *args, **kwargs)

    DTensor.full_tensor = counted  # type: ignore[method-assign]
    try:
        together = metrics.global_values(values)
        collectives_together, calls[0] = calls[0], 0
        alone = [metrics.global_value(value) for value in values]
    finally:
        DTensor.full_tensor = full_tensor  # type: ignore[method-assign]
    same = all(
        torch.equal(a, b) and a.requires_grad == b.requires_grad
        if isinstance(a, torch.Tensor)
        else a == b
        for a, b in zip(together, alone, strict=True)
    )
    return same, collectives_together, calls[0]


def test_dist_reduce_takes_the_root_of_summed_squares_across_two_ranks() -> None:
    port = free_port()
    context = torch.multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        results = manager.dict()
        processes = [
            context.Process(target=_reduce_on_two_ranks, args=(rank, port, results))
            for rank in range(2)
        ]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=120)
        assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]
        for rank in range(2):
            assert results[rank]["l2_norm/grad/a"] == pytest.approx(5.0)
            assert results[rank]["l2_norm/moment/b"] == pytest.approx(2.0)
            assert results[rank]["cosine/x"] == pytest.approx(1.0)
            assert math.isfinite(results[rank]["l2_norm/grad/a"])
            # 5 norms of 2 kinds (3 of Shard(0) tensors, fp32 all, the bf16 one's too;
            # 2 of Replicate ones), a sharded vector and a norm with a graph (its own
            # kind: stacked with the others it gave them a graph): 4 calls, not 7
            assert results[f"together {rank}"] == (True, 4, 7)
    assert os.environ.get("RANK") is None


def test_a_sparse_gradients_norm_is_its_values_norm() -> None:
    """OptimizerMonitor under SparseAdam (nn.Embedding(sparse=True)) failed after the step
    with NotImplementedError: linalg_vector_norm has no sparse kernel."""
    embedding = nn.Embedding(6, 3, sparse=True)
    embedding(torch.tensor([1, 4, 1])).square().sum().backward()
    grad = embedding.weight.grad
    assert grad.is_sparse and not grad.is_coalesced()  # row 1 twice: summed before the norm
    want = torch.linalg.vector_norm(grad.to_dense())
    torch.testing.assert_close(metrics.l2_norm(grad), want, rtol=1e-6, atol=0)


def _one_step() -> tuple[torch.optim.Optimizer, nn.Parameter]:
    param = nn.Parameter(torch.ones(3))
    optimizer = core.AdamW([param], lr=LR)
    param.grad = torch.full((3,), 0.5)
    optimizer.step()
    return optimizer, param


@pytest.mark.bad_input
@pytest.mark.parametrize("lr", [-5.0, "abc", float("nan"), True, torch.ones(2)])
def test_a_bad_lr_for_the_update_is_refused_by_name(lr: object) -> None:
    """-5 gave a meaningless update norm, "abc" a raw TypeError."""
    optimizer, param = _one_step()
    with pytest.raises(ValueError, match=r"Invalid lr: .*Allowed: None, or the finite lr >= 0"):
        metrics.parameter_metrics(optimizer, param, "w", lr=lr)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Invalid lr: "):
        metrics.parameter_update(optimizer, param, lr=lr)  # type: ignore[arg-type]


@pytest.mark.bad_input
def test_an_optimizer_that_is_not_adamkits_is_refused_by_name() -> None:
    """It failed with an AttributeError about last_step_coefficients."""
    param = nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param])
    with pytest.raises(TypeError, match=r"Invalid optimizer: torch\.optim\.adamw\.AdamW\."):
        metrics.parameter_update(optimizer, param)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Invalid optimizer: torch\.optim\.adamw\.AdamW\."):
        metrics.parameter_metrics(optimizer, param, "w")  # type: ignore[arg-type]


@pytest.mark.bad_input
def test_reducing_a_negative_norm_is_refused_before_any_change() -> None:
    """A norm not squared by pre_reduce_metrics first: "math domain error", with the
    metrics before it already replaced by their roots."""
    found = {"l2_norm/grad/a": torch.tensor(4.0), "l2_norm/grad/b": torch.tensor(-1.0)}
    with pytest.raises(ValueError, match=r"Invalid metric l2_norm/grad/b: -1\.0\. Allowed"):
        metrics.dist_reduce_metrics(found)
    assert float(found["l2_norm/grad/a"]) == 4.0
