"""The KV cache's figures on `/metrics` of a real `herd serve`: cells in use, fragmentation,
cells moved, and vLLM's prefix-cache counters, after chats whose second turns reuse the
first turns' cells."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.test_server import MODEL, Server, _start

ollama = pytest.importorskip("ollama")

pytestmark = pytest.mark.slow

GREEDY = {"num_predict": 6, "temperature": 0}


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path, test_store: object
) -> Iterator[Server]:
    yield from _start(tmp_path_factory.mktemp("cache"), test_store, {"HERD_NUM_PARALLEL": "2"})


def test_cache_figures_after_a_few_chats(server: Server) -> None:
    client = server.ollama()
    label = f'model_name="{MODEL}"'
    turns = []
    for topic in ("the sea", "the moon"):
        first = [{"role": "user", "content": f"One word about {topic}."}]
        answer = client.chat(MODEL, messages=first, options=GREEDY)
        second = [*first, answer.message.model_dump(), {"role": "user", "content": "Again."}]
        again = client.chat(MODEL, messages=second, options=GREEDY)
        turns.append((answer, again))
    values = server.metrics()
    asked = sum(a.prompt_eval_count + b.prompt_eval_count for a, b in turns)
    assert values[f"vllm:prefix_cache_queries_total{{{label}}}"] == asked
    hits = values[f"vllm:prefix_cache_hits_total{{{label}}}"]
    # each second turn found its first turn's prompt and answer cached, less the last token
    assert hits >= sum(a.prompt_eval_count + a.eval_count - 1 for a, _ in turns)
    assert hits < asked
    used = values[f"herd:kv_cache_cells_used{{{label}}}"]
    cells = values[f"herd:kv_cache_cells{{{label}}}"]
    # the second chat shares the template's opening with the first, so it took the first
    # one's slot (the longest common prefix): the cache holds its last turn, no more
    last = turns[-1][1]
    assert used == last.prompt_eval_count + last.eval_count - 1 and used < cells
    assert values[f"vllm:kv_cache_usage_perc{{{label}}}"] == pytest.approx(used / cells)
    assert 0 <= values[f"herd:kv_cache_fragmentation{{{label}}}"] < 1
    assert values[f"herd:kv_cache_cells_moved_total{{{label}}}"] >= 0
