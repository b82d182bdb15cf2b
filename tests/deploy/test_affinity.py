"""The prefix-affinity policy, the router's load counts and the in-memory ASGI call,
without a Ray cluster (fast)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from herd.deploy.affinity import NO_KEY, AffinityTable, model_key, request_key
from herd.deploy.asgi import Forwarded, Head, stream


def _chat(messages: list[dict], model: str = "m:1") -> bytes:
    return json.dumps({"model": model, "messages": messages, "options": {"seed": 1}}).encode()


TURN1 = [{"role": "user", "content": "Tell me about owls."}]
TURN2 = [*TURN1, {"role": "assistant", "content": "Owls hunt."}, {"role": "user", "content": "?"}]


def test_a_next_turn_extends_the_chain_of_the_first() -> None:
    k1, k2 = request_key("/api/chat", _chat(TURN1)), request_key("/api/chat", _chat(TURN2))
    assert k2.chain[: len(k1.chain)] == k1.chain and len(k2.chain) > len(k1.chain)
    assert k1.model == model_key("m:1") == request_key("/api/chat", _chat([])).model
    # options do not change the key; another model does
    other = json.dumps({"model": "m:1", "messages": TURN1}).encode()
    assert request_key("/api/chat", other) == k1
    assert request_key("/api/chat", _chat(TURN1, model="n:1")).chain[1] != k1.chain[1]
    assert model_key("m") == model_key("M:latest")


def test_long_messages_are_blocks_and_other_routes_have_no_key() -> None:
    long = [{"role": "user", "content": "x" * 1000}]
    key = request_key("/api/chat", _chat(long), block=256)  # 1028 characters as canonical JSON
    assert len(key.chain) == 1 + 5 and key.chars[-2:] == (1024, 1028)
    assert request_key("/api/tags", b"") == NO_KEY
    assert request_key("/api/chat", b"{not json") == NO_KEY
    prompt = json.dumps({"model": "m", "prompt": "abc"}).encode()
    assert len(request_key("/api/generate", prompt).chain) == 2


def test_rank_prefers_the_replica_with_the_prefix_until_it_is_a_hot_spot() -> None:
    table = AffinityTable(slack=2)
    k1, k2 = request_key("/api/chat", _chat(TURN1)), request_key("/api/chat", _chat(TURN2))
    table.record(k1, "b")
    assert table.rank(k2, {"a": 0, "b": 0})[0] == "b"
    assert table.rank(k2, {"a": 0, "b": 2})[0] == "b"  # within the slack
    assert table.rank(k2, {"a": 0, "b": 3})[0] == "a"  # a hot spot loses its affinity
    table.forget("b")
    assert set(table.rank(k2, {"a": 0, "b": 0})) == {"a", "b"}


def test_new_chats_spread_evenly_and_prefer_the_model_holders() -> None:
    table = AffinityTable(preloaded=["m:1"])
    firsts = Counter(
        table.rank(request_key("/api/chat", _chat([{"role": "user", "content": f"q{i}"}])),
                   {"a": 0, "b": 0, "c": 0})[0]
        for i in range(300)
    )  # fmt: skip
    assert set(firsts) == {"a", "b", "c"} and min(firsts.values()) > 60
    cold = AffinityTable()
    cold.record(request_key("/api/chat", _chat([], model="n:1")), "c")
    key = request_key("/api/chat", _chat(TURN1, model="n:1"))
    assert cold.rank(key, {"a": 0, "b": 0, "c": 0})[0] == "c"  # holds the model


def test_the_table_is_bounded() -> None:
    table = AffinityTable(capacity=10)
    for i in range(50):
        table.record(request_key("/api/chat", _chat([{"role": "user", "content": f"{i}"}])), "a")
    assert len(table.owners) == 10


async def _ticks(request: Request) -> StreamingResponse:
    body = await request.json()

    async def gen():
        for i in range(body["n"]):
            yield f"{i}\n".encode()

    return StreamingResponse(gen(), headers={"x-a": "1"})


async def _echo(request: Request) -> JSONResponse:
    return JSONResponse({"q": request.query_params["q"], "h": request.headers["x-h"]})


APP = Starlette(routes=[Route("/ticks", _ticks, methods=["POST"]), Route("/echo", _echo)])


def test_stream_runs_a_request_through_an_app_in_pieces() -> None:
    async def run(req: Forwarded) -> list[Head | bytes]:
        return [item async for item in stream(APP, req)]

    out = asyncio.run(run(Forwarded("POST", "/ticks", body=b'{"n": 3}')))
    assert isinstance(out[0], Head) and out[0].status == 200
    assert (b"x-a", b"1") in out[0].headers and out[1:] == [b"0\n", b"1\n", b"2\n"]
    out = asyncio.run(run(Forwarded("GET", "/echo", b"q=2", [(b"x-h", b"v")])))
    assert json.loads(out[1]) == {"q": "2", "h": "v"}  # type: ignore[arg-type]
    assert asyncio.run(run(Forwarded("GET", "/nowhere")))[0].status == 404  # type: ignore[union-attr]


def test_closing_the_stream_early_ends_the_app_call() -> None:
    async def first() -> Head | bytes:
        gen = stream(APP, Forwarded("POST", "/ticks", body=b'{"n": 100000}'))
        await anext(gen)
        chunk = await anext(gen)
        await gen.aclose()  # the client went away
        return chunk

    assert asyncio.run(asyncio.wait_for(first(), 10)) == b"0\n"


# ---------------------------------------------------------------- Ray's request router
def _router() -> object:
    pytest.importorskip("ray")
    from herd.deploy.ray import PrefixAffinityRouter

    router = object.__new__(PrefixAffinityRouter)  # its state only: no Ray controller
    router.initialize_state(preloaded=("m:1",))
    return router


def _pending(i: int) -> SimpleNamespace:
    key = request_key("/api/chat", _chat([{"role": "user", "content": f"q{i}"}]))
    meta = SimpleNamespace(internal_request_id=f"r{i}")
    return SimpleNamespace(kwargs={"key": key}, metadata=meta)


def test_a_request_done_before_it_is_counted_leaves_no_load() -> None:
    """Ray's router (serve/_private/router.py) registers a request's completion callback
    before it awaits the replica's accept message, and calls on_request_routed after: a
    fast answer (a 400, a 4-token reply) fires on_request_completed first. It once left a
    replica counted busy for good, and every new chat went to the other one."""
    router: Any = _router()
    a, b = SimpleNamespace(unique_id="a"), SimpleNamespace(unique_id="b")
    router.on_request_completed(a, "r0")  # done first
    router.on_request_routed(_pending(0), a, None)
    router.on_request_routed(_pending(1), b, None)  # the usual order
    assert router.inflight["a"] == 0 and router.inflight["b"] == 1
    router.on_request_completed(b, "r1")
    assert router.inflight["b"] == 0 and not router.requests and not router.early
    # a request that one replica rejected (its completion fires) and another then took
    router.on_request_completed(a, "r2")
    router.on_request_routed(_pending(2), b, None)
    assert router.inflight["b"] == 1
    router.on_request_completed(b, "r2")
    assert router.inflight["b"] == 0
