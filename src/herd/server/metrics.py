"""`/metrics`: Prometheus text exposition with vLLM's metric names.

Routers and autoscalers built for vLLM (queue depth, KV-cache pressure, latency SLOs) read
these names, so herd uses them unchanged; every series carries `model_name`. Written by
hand: the format is a few lines and the set of metrics is small and fixed.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

# (name, help) -> model -> value
Gauges = dict[str, float]

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help, buckets
        self.counts: dict[str, list[int]] = defaultdict(lambda: [0] * len(buckets))
        self.sums: dict[str, float] = defaultdict(float)
        self.totals: dict[str, int] = defaultdict(int)

    def observe(self, model: str, seconds: float) -> None:
        i = bisect.bisect_left(self.buckets, seconds)
        if i < len(self.buckets):
            self.counts[model][i] += 1
        self.sums[model] += seconds
        self.totals[model] += 1

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        for model in sorted(self.totals):
            label = _label(model)
            cumulative = 0
            for bound, n in zip(self.buckets, self.counts[model], strict=True):
                cumulative += n
                yield f'{self.name}_bucket{{{label},le="{_num(bound)}"}} {cumulative}'
            yield f'{self.name}_bucket{{{label},le="+Inf"}} {self.totals[model]}'
            yield f"{self.name}_sum{{{label}}} {_num(self.sums[model])}"
            yield f"{self.name}_count{{{label}}} {self.totals[model]}"


class Metrics:
    def __init__(self) -> None:
        self.prompt_tokens: dict[str, int] = defaultdict(int)
        self.generation_tokens: dict[str, int] = defaultdict(int)
        self.success: dict[tuple[str, str], int] = defaultdict(int)
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS,
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS,
        )
        self.tpot = Histogram(
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds.",
            ITL_BUCKETS,
        )
        # prefix caching, in tokens, as vLLM counts it: prompt tokens asked for, and those
        # found cached (a slot's kept prefix); the cache's last figures per model
        self.prefix_queries: dict[str, int] = defaultdict(int)
        self.prefix_hits: dict[str, int] = defaultdict(int)
        self.kv_cache: dict[str, dict[str, float]] = {}
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.",
            E2E_BUCKETS,
        )

    def finished(
        self,
        model: str,
        reason: str,
        prompt_tokens: int,
        generated: int,
        eval_seconds: float,
        total_seconds: float,
    ) -> None:
        self.prompt_tokens[model] += prompt_tokens
        self.generation_tokens[model] += generated
        self.success[(model, reason or "abort")] += 1
        self.e2e.observe(model, total_seconds)
        if generated > 1:
            self.tpot.observe(model, eval_seconds / (generated - 1))

    def cache(self, model: str, done: dict[str, Any]) -> None:
        """A request's final message from the runner: its prefix hits, and the cache's
        figures after it (`Causal.stats`)."""
        self.prefix_queries[model] += int(done.get("prompt_eval_count", 0))
        self.prefix_hits[model] += int(done.get("prompt_cached_count", 0))
        figures = done.get("kv_cache")
        if isinstance(figures, dict) and figures:
            self.kv_cache[model] = {k: float(v) for k, v in figures.items()}

    def render(self, gauges: Callable[[], dict[str, Gauges]]) -> str:
        """The exposition; `gauges()` gives the live values per model (running, waiting, kv)."""
        live = gauges()
        lines: list[str] = []
        for name, help, key in (
            (
                "vllm:num_requests_running",
                "Number of requests in model execution batches.",
                "running",
            ),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", "waiting"),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", "kv"),
        ):
            lines += [f"# HELP {name} {help}", f"# TYPE {name} gauge"]
            lines += [f"{name}{{{_label(m)}}} {_num(v[key])}" for m, v in sorted(live.items())]
        for name, help, values in (
            ("vllm:prompt_tokens_total", "Number of prefill tokens processed.", self.prompt_tokens),
            (
                "vllm:generation_tokens_total",
                "Number of generation tokens processed.",
                self.generation_tokens,
            ),
        ):
            lines += [f"# HELP {name} {help}", f"# TYPE {name} counter"]
            lines += [f"{name}{{{_label(m)}}} {v}" for m, v in sorted(values.items())]
        lines += self._cache_lines(live)
        name = "vllm:request_success_total"
        lines += [
            f"# HELP {name} Count of successfully processed requests.",
            f"# TYPE {name} counter",
        ]
        lines += [
            f'{name}{{finished_reason="{_escape(r)}",{_label(m)}}} {n}'
            for (m, r), n in sorted(self.success.items())
        ]
        for h in (self.ttft, self.itl, self.tpot, self.e2e):
            lines += h.render()
        return "\n".join(lines) + "\n"

    def _cache_lines(self, live: dict[str, Gauges]) -> list[str]:
        """vLLM's prefix-cache counters; herd's own cache figures, for loaded models."""
        lines: list[str] = []
        for name, help, values in (
            (
                "vllm:prefix_cache_queries_total",
                "Prefix cache queries, in terms of number of queried tokens.",
                self.prefix_queries,
            ),
            (
                "vllm:prefix_cache_hits_total",
                "Prefix cache hits, in terms of number of cached tokens.",
                self.prefix_hits,
            ),
        ):
            lines += [f"# HELP {name} {help}", f"# TYPE {name} counter"]
            lines += [f"{name}{{{_label(m)}}} {v}" for m, v in sorted(values.items())]
        figures = {m: f for m, f in sorted(self.kv_cache.items()) if m in live}
        for name, kind, help, key in (
            ("herd:kv_cache_cells_used", "gauge", "KV cache cells in use.", "cells_used"),
            ("herd:kv_cache_cells", "gauge", "KV cache cells in all.", "cells"),
            (
                "herd:kv_cache_fragmentation",
                "gauge",
                "KV cache cells inside each sequence's range not its own, over those ranges.",
                "fragmentation",
            ),
            (
                "herd:kv_cache_cells_moved_total",
                "counter",
                "KV cache cells moved to keep sequences compact, since the model loaded.",
                "cells_moved",
            ),
            (
                "herd:kv_cache_cells_shared",
                "gauge",
                "KV cache cells held once for several sequences (a prefix slots share).",
                "cells_shared",
            ),
            (
                "herd:kv_cache_shared_tokens_total",
                "counter",
                "Prompt tokens a slot took as another slot's cells, not computed or copied.",
                "shared_tokens",
            ),
            (
                "herd:prompt_cache_bytes",
                "gauge",
                "Host memory holding prompts that left the slots (HERD_PROMPT_CACHE).",
                "prompt_cache_bytes",
            ),
            (
                "herd:prompt_cache_prompts",
                "gauge",
                "Prompts in the prompt cache.",
                "prompt_cache_prompts",
            ),
            (
                "herd:prompt_cache_restored_tokens_total",
                "counter",
                "Tokens copied into slots (from the prompt cache or a busy slot), not computed.",
                "prompt_cache_restored",
            ),
        ):
            lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
            lines += [
                f"{name}{{{_label(m)}}} {_num(f[key])}" for m, f in figures.items() if key in f
            ]
        return lines


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _label(model: str) -> str:
    return f'model_name="{_escape(model)}"'


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x))
