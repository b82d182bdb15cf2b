"""/metrics' cache figures from the runner's final messages (no server: `Metrics` alone)."""

from __future__ import annotations

from herd.server.metrics import Metrics


def test_cache_figures_and_prefix_counters_render() -> None:
    m = Metrics()
    figures = {"cells_used": 120, "cells": 1024, "fragmentation": 0.25, "cells_moved": 30,
               "prompt_cache_bytes": 4096, "prompt_cache_prompts": 2,
               "prompt_cache_restored": 48}  # fmt: skip
    m.cache("m:1", {"prompt_eval_count": 50, "prompt_cached_count": 0, "kv_cache": figures})
    m.cache("m:1", {"prompt_eval_count": 70, "prompt_cached_count": 56, "kv_cache": figures})
    m.cache("gone:1", {"prompt_eval_count": 9, "kv_cache": figures})  # since unloaded
    live = {"m:1": {"running": 0, "waiting": 0, "kv": 120 / 1024}}
    lines = m.render(lambda: live).splitlines()
    assert 'vllm:prefix_cache_queries_total{model_name="m:1"} 120' in lines
    assert 'vllm:prefix_cache_hits_total{model_name="m:1"} 56' in lines
    assert 'vllm:prefix_cache_queries_total{model_name="gone:1"} 9' in lines  # a counter
    assert "# TYPE herd:kv_cache_fragmentation gauge" in lines
    assert 'herd:kv_cache_cells_used{model_name="m:1"} 120.0' in lines
    assert 'herd:kv_cache_cells{model_name="m:1"} 1024.0' in lines
    assert 'herd:kv_cache_fragmentation{model_name="m:1"} 0.25' in lines
    assert 'herd:kv_cache_cells_moved_total{model_name="m:1"} 30.0' in lines
    assert 'herd:prompt_cache_bytes{model_name="m:1"} 4096.0' in lines
    assert 'herd:prompt_cache_prompts{model_name="m:1"} 2.0' in lines
    assert "# TYPE herd:prompt_cache_restored_tokens_total counter" in lines
    assert 'herd:prompt_cache_restored_tokens_total{model_name="m:1"} 48.0' in lines
    assert not any(line.startswith("herd:") and "gone:1" in line for line in lines)
