"""herd's autoscaling policy for Ray Serve: replicas scaled on their own gauges.

Each HerdReplica reports through Ray Serve's `record_autoscaling_stats` what its `/metrics`
shows, summed over its models (`replica_stats`): `herd_running` (sequences in a slot),
`herd_waiting` (requests queued for a slot or a load: the queue depth), `herd_kv_usage` (its
fullest KV cache) and `herd_slots` (the parallel slots of the models with requests, of every
loaded model when idle). Ray averages each over `look_back_period_s` and calls `HerdPolicy` on
every control-loop tick with them per replica.

How it decides, with demand = running + waiting summed over the replicas that reported, plus
the requests Ray still holds at its handles (beyond a replica's max_ongoing_requests):
- need = ceil(demand / (slots per replica x target)), `target` the utilization aimed at (0.8).
- Up: to need when need exceeds the running replicas; and at least one more at once when a
  replica has a queue while every replica is busy (a queue, its slots filled to target, or its
  KV cache over `kv_high` (0.9) with sequences running). A queue beside an idle replica is left to
  the router (affinity yields to load), not answered with another replica.
- Down: to need, only once demand has fit in fewer replicas, with no queue anywhere, for
  `down_after_s` (60 s) without a break (when that began is kept in policy_state), so a lull between
  bursts does not drop a replica the next burst needs.
- Clamped to the capacity-adjusted min and max replicas.
- Until some replica has reported herd's gauges (a deployment just starting): Ray's default
  policy, on requests in flight per replica (`target_ongoing_requests`).
Ray applies its own delays and scaling factors on top; `herd.deploy.ray` sets the delays to 0
unless given, as the policy waits itself.

No herd or Ray import at the top: Ray pickles this module by value into its controller, and
the tests drive the policy with fake contexts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

RUNNING, WAITING, KV, SLOTS = "herd_running", "herd_waiting", "herd_kv_usage", "herd_slots"
LOW_SINCE = "herd_low_since"  # policy_state: when demand began to fit in fewer replicas


class Load(NamedTuple):
    """One replica's gauges, as Ray aggregated them."""

    running: float
    waiting: float
    kv: float
    slots: float


def replica_stats(
    gauges: Mapping[str, Mapping[str, float]], parallel: Mapping[str, int], default: int
) -> dict[str, float]:
    """A replica's report from its scheduler's gauges (model -> running, waiting, kv) and
    the slots of its loaded models (`default` slots for a model still loading)."""
    active = [m for m, g in gauges.items() if g.get("running", 0.0) or g.get("waiting", 0.0)]
    # slots of the models in demand: an idle embedding model beside a busy chat model is
    # no capacity for the chats
    slots = sum(parallel.get(m, default) for m in active or parallel) or default
    return {
        RUNNING: float(sum(g.get("running", 0.0) for g in gauges.values())),
        WAITING: float(sum(g.get("waiting", 0.0) for g in gauges.values())),
        KV: float(max((g.get("kv", 0.0) for g in gauges.values()), default=0.0)),
        SLOTS: float(slots),
    }


def loads(metrics: Mapping[str, Mapping[Any, float]] | None) -> dict[Any, Load]:
    """Replica id -> its Load, for the replicas that reported herd's gauges."""
    if not metrics or not metrics.get(SLOTS):
        return {}
    got = {name: metrics.get(name) or {} for name in (RUNNING, WAITING, KV)}
    return {
        r: Load(got[RUNNING].get(r, 0.0), got[WAITING].get(r, 0.0), got[KV].get(r, 0.0), s)
        for r, s in metrics[SLOTS].items()
    }


class HerdPolicy:
    """Ray Serve's `AutoscalingPolicy(policy_function=HerdPolicy, policy_kwargs=...)`: Ray
    makes one and calls it with an `AutoscalingContext` each tick; it returns (replicas,
    policy_state)."""

    def __init__(self, target: float = 0.8, down_after_s: float = 60.0, kv_high: float = 0.9):
        if not 0.0 < target <= 1.0:
            raise ValueError(f"target utilization must be in (0, 1], not {target}")
        if down_after_s < 0:
            raise ValueError(f"down_after_s must be at least 0, not {down_after_s}")
        self.target, self.down_after_s, self.kv_high = target, down_after_s, kv_high

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        state = dict(ctx.policy_state or {})
        seen = loads(ctx.aggregated_metrics)
        if not seen:
            state.pop(LOW_SINCE, None)
            return _ray_default(ctx), state
        now = ctx.current_time if ctx.current_time is not None else time.time()
        backlog = getattr(ctx, "total_queued_requests", None) or 0.0
        desired, low_since = self.decide(
            seen,
            ctx.current_num_replicas,
            ctx.capacity_adjusted_min_replicas,
            ctx.capacity_adjusted_max_replicas,
            now,
            state.get(LOW_SINCE),
            backlog,
        )
        if low_since is None:
            state.pop(LOW_SINCE, None)
        else:
            state[LOW_SINCE] = low_since
        return desired, state

    def decide(
        self,
        seen: Mapping[Any, Load],
        current: int,
        lo: int,
        hi: int,
        now: float,
        low_since: float | None,
        backlog: float = 0.0,
    ) -> tuple[int, float | None]:
        """(replicas, when demand began to fit in fewer, or None) from the replicas' loads
        and the requests not handed to a replica yet (`backlog`)."""
        demand = backlog + sum(x.running + x.waiting for x in seen.values())
        slots = max(1.0, sum(x.slots for x in seen.values()) / len(seen))
        need = math.ceil(demand / (slots * self.target) - 1e-9)  # 1.6/1.6 is 1, not 2
        queued = backlog > 0 or any(x.waiting > 0 for x in seen.values())
        # a replica that has not reported yet is starting: it is capacity, not busy
        all_busy = len(seen) >= current and all(self._busy(x) for x in seen.values())
        desired = current
        if queued and all_busy:
            desired, low_since = max(need, current + 1), None
        elif need > current:
            desired, low_since = need, None
        elif need < current and not queued:
            low_since = now if low_since is None else low_since
            if now - low_since >= self.down_after_s:
                desired = need
        else:
            low_since = None
        return max(lo, min(hi, desired)), low_since

    def _busy(self, x: Load) -> bool:
        full = x.running >= x.slots * self.target
        return x.waiting > 0 or full or (x.running > 0 and x.kv >= self.kv_high)


def _ray_default(ctx: Any) -> float:
    from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

    desired, _ = replica_queue_length_autoscaling_policy(ctx)
    return desired
