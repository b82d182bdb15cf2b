"""herd's autoscaling policy (`herd.deploy.autoscale`) on fake contexts: no Ray cluster.

A context is what Ray's controller hands the policy each tick: the replicas' aggregated
gauges (metric -> replica -> value), the running replica count, the capacity-adjusted bounds,
the policy's state and the time. The last tests run the policy as Ray's controller does
(pickled, made from its kwargs, wrapped with Ray's delays and bounds), still without a cluster.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from herd.deploy.autoscale import (
    KV,
    LOW_SINCE,
    RUNNING,
    SLOTS,
    WAITING,
    HerdPolicy,
    Load,
    loads,
    replica_stats,
)


def _metrics(**replicas: tuple[float, float, float, float]) -> dict[str, dict[str, float]]:
    """replica -> (running, waiting, kv, slots), as Ray aggregates them per metric."""
    out: dict[str, dict[str, float]] = {RUNNING: {}, WAITING: {}, KV: {}, SLOTS: {}}
    for rid, (running, waiting, kv, slots) in replicas.items():
        out[RUNNING][rid], out[WAITING][rid], out[KV][rid], out[SLOTS][rid] = (
            running,
            waiting,
            kv,
            slots,
        )
    return out


def _ctx(
    metrics: dict[str, dict[str, float]] | None,
    current: int,
    *,
    lo: int = 1,
    hi: int = 4,
    now: float = 0.0,
    state: dict[str, Any] | None = None,
    **extra: Any,
) -> SimpleNamespace:
    return SimpleNamespace(
        aggregated_metrics=metrics,
        current_num_replicas=current,
        target_num_replicas=current,
        running_replicas=[f"r{i}" for i in range(current)],
        capacity_adjusted_min_replicas=lo,
        capacity_adjusted_max_replicas=hi,
        current_time=now,
        policy_state=state or {},
        **extra,
    )


# ---------------------------------------------------------------- what a replica reports
def test_replica_stats_sum_the_models_and_count_the_slots_in_demand() -> None:
    gauges = {
        "chat": {"running": 4.0, "waiting": 3.0, "kv": 0.5},
        "embed": {"running": 0.0, "waiting": 0.0, "kv": 0.9},
    }
    stats = replica_stats(gauges, {"chat": 4, "embed": 2}, default=4)
    # the idle embedding model's slots are no capacity for the chats
    assert stats == {RUNNING: 4.0, WAITING: 3.0, KV: 0.9, SLOTS: 4.0}


def test_replica_stats_when_idle_or_loading() -> None:
    idle = {"chat": {"running": 0.0, "waiting": 0.0, "kv": 0.2}}
    assert replica_stats(idle, {"chat": 4, "embed": 2}, default=4)[SLOTS] == 6.0
    assert replica_stats({}, {}, default=3) == {RUNNING: 0.0, WAITING: 0.0, KV: 0.0, SLOTS: 3.0}
    loading = {"chat": {"running": 0.0, "waiting": 2.0, "kv": 0.0}}  # not loaded yet
    assert replica_stats(loading, {}, default=4)[SLOTS] == 4.0


def test_loads_are_the_replicas_that_reported() -> None:
    assert loads(None) == {} and loads({}) == {} and loads({"other": {"r0": 1.0}}) == {}
    assert loads(_metrics(r0=(1, 2, 0.5, 4))) == {"r0": Load(1, 2, 0.5, 4)}


# ---------------------------------------------------------------- up
def test_up_to_what_the_demand_needs_on_a_queue() -> None:
    policy = HerdPolicy()  # target 0.8: a 4-slot replica carries 3.2
    desired, state = policy(_ctx(_metrics(r0=(4, 6, 0.3, 4)), 1))
    assert desired == 4  # ceil(10 / 3.2)
    assert LOW_SINCE not in state


def test_a_queue_with_every_replica_busy_adds_one_at_once() -> None:
    # demand fits two replicas by the numbers, but both have a queue: one more now
    both = _metrics(r0=(2, 0.5, 0.3, 4), r1=(2, 0.5, 0.3, 4))
    assert HerdPolicy()(_ctx(both, 2))[0] == 3


def test_requests_held_at_rays_handles_count_as_a_queue() -> None:
    full = _metrics(r0=(4, 0, 0.3, 4), r1=(4, 0, 0.3, 4))  # at the slots, no herd queue
    assert HerdPolicy(target=1.0)(_ctx(full, 2))[0] == 2
    assert HerdPolicy(target=1.0)(_ctx(full, 2, hi=8, total_queued_requests=9.0))[0] == 5


def test_a_queue_beside_an_idle_replica_is_the_routers() -> None:
    skewed = _metrics(r0=(4, 1, 0.3, 4), r1=(0, 0, 0.0, 4))
    assert HerdPolicy()(_ctx(skewed, 2))[0] == 2


def test_a_replica_not_reported_yet_is_starting_not_busy() -> None:
    # two running, one reported (the other is new): no third on the first one's queue
    assert HerdPolicy()(_ctx(_metrics(r0=(4, 1, 0.3, 4)), 2))[0] == 2


def test_a_full_kv_cache_counts_as_busy() -> None:
    full = _metrics(r0=(1, 0.5, 0.95, 4), r1=(1, 0, 0.95, 4))
    assert HerdPolicy()(_ctx(full, 2))[0] == 3
    assert HerdPolicy(kv_high=1.0)(_ctx(full, 2))[0] == 2


# ---------------------------------------------------------------- down
def test_down_only_after_demand_fit_for_down_after_s() -> None:
    policy = HerdPolicy(down_after_s=60)
    low = _metrics(r0=(1, 0, 0.2, 4), r1=(0, 0, 0.1, 4))  # fits one replica
    desired, state = policy(_ctx(low, 2, now=100.0))
    assert desired == 2 and state[LOW_SINCE] == 100.0
    desired, state = policy(_ctx(low, 2, now=130.0, state=state))
    assert desired == 2 and state[LOW_SINCE] == 100.0
    desired, state = policy(_ctx(low, 2, now=160.0, state=state))
    assert desired == 1


def test_a_burst_in_the_lull_restarts_the_wait() -> None:
    policy = HerdPolicy(down_after_s=60)
    low = _metrics(r0=(1, 0, 0.2, 4), r1=(0, 0, 0.1, 4))
    busy = _metrics(r0=(3, 0, 0.2, 4), r1=(2, 0, 0.1, 4))  # needs both
    _, state = policy(_ctx(low, 2, now=0.0))
    desired, state = policy(_ctx(busy, 2, now=30.0, state=state))
    assert desired == 2 and LOW_SINCE not in state
    _, state = policy(_ctx(low, 2, now=40.0, state=state))
    desired, state = policy(_ctx(low, 2, now=70.0, state=state))
    assert desired == 2  # 30 s low since the burst, not 70


def test_no_scale_down_while_a_replica_has_a_queue() -> None:
    queued = _metrics(r0=(0, 0.2, 0.2, 4), r1=(0, 0, 0.0, 4), r2=(0, 0, 0.0, 4))
    desired, state = HerdPolicy(down_after_s=0)(_ctx(queued, 3))
    assert desired == 3 and LOW_SINCE not in state


def test_the_policy_keeps_other_state() -> None:
    ray_keys = {"decision_counter": -2}  # Ray's own delay bookkeeping shares the dict
    _, state = HerdPolicy()(_ctx(_metrics(r0=(0, 0, 0, 4)), 2, state=ray_keys))
    assert state["decision_counter"] == -2 and LOW_SINCE in state


# ---------------------------------------------------------------- bounds
def test_clamped_to_the_capacity_adjusted_bounds() -> None:
    policy = HerdPolicy(down_after_s=0)
    assert policy(_ctx(_metrics(r0=(4, 40, 0.5, 4)), 1, hi=3))[0] == 3
    idle = _metrics(r0=(0, 0, 0, 4), r1=(0, 0, 0, 4), r2=(0, 0, 0, 4))
    assert policy(_ctx(idle, 3, lo=2))[0] == 2
    assert policy(_ctx(_metrics(r0=(0, 0, 0, 4)), 1, lo=0))[0] == 0


def test_bad_options() -> None:
    for kwargs in ({"target": 0.0}, {"target": 1.5}, {"down_after_s": -1}):
        with pytest.raises(ValueError):
            HerdPolicy(**kwargs)


# ---------------------------------------------------------------- Ray's side
def test_no_herd_metrics_yet_falls_back_to_rays_default() -> None:
    pytest.importorskip("ray")
    from ray.serve.config import AutoscalingConfig

    config = AutoscalingConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=2)
    ctx = _ctx(None, 2, total_num_requests=12.0, config=config, state={LOW_SINCE: 5.0, "k": 1})
    desired, state = HerdPolicy()(ctx)
    assert desired == 6  # Ray's: 12 in flight / 2 per replica
    assert state == {"k": 1}


def _wrapped(config: Any) -> Any:
    """The policy as Ray's controller runs it: unpickled, built from policy_kwargs, wrapped
    with Ray's scaling factors and delays (private API: see autoscaling_state.py)."""
    from ray.serve._private.autoscaling_state import _resolve_policy_callable
    from ray.serve.autoscaling_policy import _apply_autoscaling_config

    return _apply_autoscaling_config(_resolve_policy_callable(config.policy))


def _ray_ctx(config: Any, metrics: dict[str, dict[str, float]], current: int) -> Any:
    from ray.serve.config import AutoscalingContext

    return AutoscalingContext(
        deployment_id=None,
        deployment_name="HerdReplica",
        app_name="herd",
        current_num_replicas=current,
        target_num_replicas=current,
        running_replicas=list(metrics[SLOTS]),
        total_num_requests=0.0,
        total_queued_requests=0.0,
        aggregated_metrics=lambda: metrics,
        raw_metrics=None,
        capacity_adjusted_min_replicas=config.min_replicas,
        capacity_adjusted_max_replicas=config.max_replicas,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=1000.0,
        config=config,
    )


def test_plan_autoscaling_uses_herds_policy_through_rays_controller_path() -> None:
    pytest.importorskip("ray")
    from herd.deploy.ray import Plan, autoscaling_config

    scaling = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4}
    config = autoscaling_config(Plan(autoscaling=scaling, policy_options={"down_after_s": 0}))
    assert config.policy.policy_function == "herd.deploy.autoscale.HerdPolicy"
    assert config.policy.policy_kwargs == {"down_after_s": 0}
    assert config.upscale_delay_s == 0 and config.downscale_delay_s == 0
    policy = _wrapped(config)
    desired, _ = policy(_ray_ctx(config, _metrics(r0=(4, 2, 0.3, 4)), 1))
    assert desired == 2  # at once: Ray's delays are 0 under herd's policy
    idle = _metrics(r0=(0, 0, 0, 4), r1=(0, 0, 0, 4))
    assert policy(_ray_ctx(config, idle, 2))[0] == 1


def test_rays_policy_and_given_delays_are_kept() -> None:
    pytest.importorskip("ray")
    from herd.deploy import ClusterError
    from herd.deploy.ray import Plan, autoscaling_config

    scaling = {"min_replicas": 1, "max_replicas": 3, "upscale_delay_s": 5.0}
    assert autoscaling_config(Plan(autoscaling=scaling)).upscale_delay_s == 5.0
    rays = autoscaling_config(Plan(autoscaling=scaling, policy="ray"))
    assert rays.policy.is_default_policy_function() and rays.upscale_delay_s == 5.0
    with pytest.raises(ClusterError, match="target"):
        autoscaling_config(Plan(autoscaling=scaling, policy_options={"target": 2.0}))
    with pytest.raises(ClusterError, match="'k8s'"):
        autoscaling_config(Plan(autoscaling=scaling, policy="k8s"))
