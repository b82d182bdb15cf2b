"""One model over two machines' worth of ggml RPC servers, on loopback: two `herd
rpc-server` processes hold half of SmolLM2's layers each (HERD_RPC names them), and the
logits and greedy tokens are the single-process ggml backend's (the servers run the same
CPU kernels; only the activations travel)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest

import herd
from herd.errors import BackendError
from herd.ml import available_backends

pytestmark = pytest.mark.skipif(
    "ggml" not in available_backends(), reason="ggml-python not installed (make install-test)"
)

PROMPT = "The capital of France is Paris. The capital of Italy is"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def rpc_servers() -> Iterator[list[str]]:
    from herd.ml.backends.ggml import rpc

    endpoints, procs = [], []
    for _ in range(2):
        port = _free_port()
        cmd = [sys.executable, "-m", "herd", "rpc-server", "--port", str(port), "--threads", "2"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        endpoints.append(f"127.0.0.1:{port}")
    try:
        for endpoint, proc in zip(endpoints, procs, strict=True):
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"herd rpc-server exited: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
                try:
                    rpc.check(endpoint)  # the server serves one client at a time: answered
                    break
                except BackendError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        yield endpoints
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def local(smollm2_path) -> dict:
    llm = herd.load(smollm2_path, backend="ggml")
    ids = llm.tokenize(PROMPT)
    greedy = llm.generate(PROMPT, raw=True, options={"temperature": 0, "num_predict": 24})
    out = {"ids": ids, "logits": llm.logits(ids), "tokens": greedy["context"][len(ids) :]}
    llm.close()
    return out


def test_two_rpc_servers_hold_half_the_layers_each_with_the_local_logits(
    smollm2_path, rpc_servers, local, monkeypatch
):
    monkeypatch.setenv("HERD_RPC", ",".join(rpc_servers))
    llm = herd.load(smollm2_path, backend="ggml")
    try:
        backend = llm.backend
        names = [g.device.info.name for g in backend.gpus]
        assert [n.rpartition(" (")[2].rstrip(")") for n in names] == rpc_servers
        layers = backend.plan.layers  # 30 blocks and the output layer
        counts = [layers.count(0), layers.count(1)]
        assert None not in layers and abs(counts[0] - counts[1]) <= 1, layers
        assert layers == sorted(layers)  # contiguous: activations cross once per server
        assert not backend.flash_attention  # as on the CPU: the same kernels as local
        # the fit check counted each server's own memory, as the server reports it
        needs = {n.name: n for n in backend.plan.needs}
        for gpu in backend.gpus:
            need = needs[gpu.device.info.name]
            assert need.gpu and need.weights > 0 and need.free == gpu.device.info.free_memory
            assert 0 < need.free <= gpu.device.info.total_memory
        assert llm.loaded.processor["device"] == "rpc"

        # in the local run's order: a prompt evaluated whole or after a cached prefix
        # takes other kernels (the batch sizes differ), which can flip a near tie
        greedy = llm.generate(PROMPT, raw=True, options={"temperature": 0, "num_predict": 24})
        assert greedy["context"][len(local["ids"]) :] == local["tokens"]
        assert len(local["tokens"]) == 24
        np.testing.assert_array_equal(llm.logits(local["ids"]), local["logits"])
    finally:
        llm.close()


def test_a_taken_port_is_a_clear_error(rpc_servers):
    port = rpc_servers[0].rpartition(":")[2]
    cmd = [sys.executable, "-m", "herd", "rpc-server", "--port", port]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert f"RPC server on 127.0.0.1:{port} could not start" in out.stderr
    assert "Traceback" not in out.stderr


GONE = """
import subprocess, sys, herd
from herd.errors import BackendError
from herd.ml import BackendOptions, default_devices
server = subprocess.Popen([sys.executable, "-m", "herd", "rpc-server", "--port", sys.argv[2]])
endpoint = "127.0.0.1:" + sys.argv[2]
from herd.ml.backends.ggml import rpc
import time
for _ in range(300):
    try:
        rpc.check(endpoint)
        break
    except BackendError:
        time.sleep(0.1)
opts = BackendOptions(rpc_servers=(endpoint,))
assert any(d.kind == "rpc" for d in default_devices("ggml", opts))
server.kill(); server.wait()
# ggml keeps the server registered; nothing here may ask it for anything (ggml would abort)
assert all(d.kind != "rpc" for d in default_devices("ggml"))
herd.load(sys.argv[1], backend="ggml").close()
try:
    default_devices("ggml", opts)
except BackendError as e:
    print("refused:", e)
"""


def test_a_server_gone_away_is_never_asked_again(smollm2_path, tmp_path):
    """A process that used a server keeps it registered in ggml: later probes and loads
    must not touch it (ggml aborts on a server it cannot reach)."""
    script = tmp_path / "gone.py"
    script.write_text(GONE)
    out = subprocess.run(
        [sys.executable, str(script), str(smollm2_path), str(_free_port())],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "refused: RPC server 127.0.0.1:" in out.stdout and "cannot be reached" in out.stdout
