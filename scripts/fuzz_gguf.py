"""Fuzz herd's GGUF handling: mutated model files through the reader, `herd show` and both
backends' loaders, each in a child process with a time and memory bound.

    python scripts/fuzz_gguf.py --mutants 10000 --seed 1     # `make fuzz`
    python scripts/fuzz_gguf.py --seed 1 --only 1234          # rerun one mutant, traceback

Seed files: two tiny random Llamas written with herd's writer (SentencePiece vocabulary
with F32/F16 weights; byte-level BPE with Q8_0/Q4_0 weights and 64-byte alignment).
Mutants: truncations, flipped bytes in the header, metadata, tensor-info and data regions,
huge or boundary values in counts, lengths, types, dims and offsets, alignment 0 or odd,
unaligned, overlapping and duplicate tensors, inserted and deleted bytes. Mutant i of a
seed is a pure function of (seed, i), so `--only i` reproduces it.

Each mutant runs in a child forked from this process (herd already imported): `open_gguf`,
`load_facts` + `render_info(verbose=True)` (herd show -v), `herd.load(backend="numpy")`,
`herd.load(backend="ggml")`, and a tokenization. Outcomes: a clean HerdError, a load,
a traceback (any other exception: a bug), a hang (over --timeout seconds), an allocation
over the bound (MemoryError under RLIMIT_AS = the child's address space at the start +
256 MiB + 16x the file's size), a native crash (the child killed by a signal), or output
of `show -v` over its bound.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import resource
import select
import signal
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

# one thread per child (BLAS, ggml): two workers on two cores, and fork-safe
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MALLOC_ARENA_MAX", "2")

from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import quantize  # noqa: E402

from herd.gguf.writer import write_gguf  # noqa: E402

MEM_FIXED, MEM_PER_BYTE = 256 << 20, 16  # the allocation bound beyond the child's baseline
SHOW_LIMIT = 1 << 20  # `herd show -v` of a small file prints less than this

# ---- seed files ------------------------------------------------------------------------


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (byte-level BPE's base vocabulary)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def _llama(rng: np.random.Generator, d: int, ff: int, vocab: int, quant: bool) -> list[Any]:
    w = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)  # noqa: E731

    def weight(a: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q | None]:
        if not quant:
            return (a.astype(np.float16), None) if qtype == Q.F16 else (a, None)
        return quantize(a, qtype), qtype

    tensors = [("token_embd.weight", *weight(w(vocab, d), Q.Q8_0))]
    tensors.append(("output_norm.weight", 1 + w(d), None))
    for i in range(2):
        p = f"blk.{i}."
        tensors += [
            (p + "attn_norm.weight", 1 + w(d), None),
            (p + "attn_q.weight", *weight(w(d, d), Q.Q8_0 if quant else Q.F16)),
            (p + "attn_k.weight", *weight(w(d // 2, d), Q.Q4_0 if quant else Q.F32)),
            (p + "attn_v.weight", *weight(w(d // 2, d), Q.Q4_0 if quant else Q.F32)),
            (p + "attn_output.weight", *weight(w(d, d), Q.Q8_0 if quant else Q.F16)),
            (p + "ffn_norm.weight", 1 + w(d), None),
            (p + "ffn_gate.weight", *weight(w(ff, d), Q.Q8_0 if quant else Q.F32)),
            (p + "ffn_up.weight", *weight(w(ff, d), Q.Q8_0 if quant else Q.F32)),
            (p + "ffn_down.weight", *weight(w(d, ff), Q.Q4_0 if quant else Q.F32)),
        ]
    return tensors


def seed_files(directory: Path) -> list[Path]:
    """The two valid files every mutant starts from (same bytes on every run)."""
    rng = np.random.default_rng(0)
    common = {
        "llama.block_count": 2,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.context_length": 128,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.freq_base": 10000.0,
        "general.name": "fuzz",
    }
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    spm = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(16)], "\u2581", *letters]
    spm += ["\u2581" + c for c in letters[:13]]
    kv_spm = {
        **common,
        "llama.embedding_length": 16,
        "llama.feed_forward_length": 32,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": spm,
        "tokenizer.ggml.scores": [float(-i) for i in range(len(spm))],
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 16 + [1] * (len(spm) - 19),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }
    byte_level = _bytes_to_unicode()
    merges = ["Ġ t", "h e", "Ġt he", "i n", "e r"]
    vocab = [*byte_level, "Ġt", "he", "Ġthe", "in", "er", "<|endoftext|>"]
    kv_bpe = {
        **common,
        "llama.embedding_length": 32,
        "llama.feed_forward_length": 64,
        "general.alignment": 64,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": vocab,
        "tokenizer.ggml.token_type": [1] * (len(vocab) - 1) + [3],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": len(vocab) - 1,
    }
    directory.mkdir(parents=True, exist_ok=True)
    a = write_gguf(
        directory / "seed-spm.gguf", "llama", kv_spm, _llama(rng, 16, 32, len(spm), False)
    )
    b = write_gguf(
        directory / "seed-bpe.gguf", "llama", kv_bpe, _llama(rng, 32, 64, len(vocab), True)
    )
    return [a, b]


# ---- where the fields are --------------------------------------------------------------


def field_map(data: bytes) -> dict[str, list[tuple[int, int]]]:
    """Byte ranges (offset, size) of a valid file's fields by kind: counts, string
    lengths, value types, array counts, scalars, tensor dims, types and offsets, the
    alignment value, names; and 'data' (the tensor data) and 'header' (everything before)."""
    out: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
    pos = 8
    n_tensors, n_kv = struct.unpack_from("<QQ", data, pos)
    out["count"] += [(8, 8), (16, 8)]
    pos = 24
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def string(kind: str) -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        out["length"].append((pos, 8))
        out[kind].append((pos + 8, n))
        s = data[pos + 8 : pos + 8 + n].decode()
        pos += 8 + n
        return s

    for _ in range(n_kv):
        key = string("key")
        (vt,) = struct.unpack_from("<I", data, pos)
        out["vtype"].append((pos, 4))
        pos += 4
        if vt in sizes:
            out["alignment" if key == "general.alignment" else "scalar"].append((pos, sizes[vt]))
            pos += sizes[vt]
        elif vt == 8:
            string("string")
        else:
            et, n = struct.unpack_from("<IQ", data, pos)
            out["vtype"].append((pos, 4))
            out["array_count"].append((pos + 4, 8))
            pos += 12
            for _ in range(n):
                if et == 8:
                    string("string")
                else:
                    out["scalar"].append((pos, sizes[et]))
                    pos += sizes[et]
    for _ in range(n_tensors):
        string("name")
        (nd,) = struct.unpack_from("<I", data, pos)
        out["n_dims"].append((pos, 4))
        out["dim"] += [(pos + 4 + 8 * j, 8) for j in range(nd)]
        pos += 4 + 8 * nd
        out["ttype"].append((pos, 4))
        out["offset"].append((pos + 4, 8))
        pos += 12
    out["header"].append((0, pos))
    out["data"].append((pos, len(data) - pos))
    return out


INTERESTING = [0, 1, 2, 3, 5, 31, 33, 63, 64, 255, 256, 1 << 16, 1 << 27, 1 << 31, (1 << 31) - 1,
               1 << 32, (1 << 32) - 1, 1 << 62, 1 << 63, (1 << 64) - 1]  # fmt: skip


def _put(buf: bytearray, at: int, size: int, value: int) -> None:
    buf[at : at + size] = (value % (1 << (8 * size))).to_bytes(size, "little")


def mutate(
    data: bytes, fields: dict[str, list[tuple[int, int]]], rng: np.random.Generator
) -> bytes:
    """One mutant of a valid file (see the module's docstring for the kinds)."""
    buf = bytearray(data)
    header_end = fields["header"][0][1]
    kind = int(rng.integers(10))
    pick = lambda name: fields[name][int(rng.integers(len(fields[name])))]  # noqa: E731
    if kind == 0:  # truncate, mostly inside the header
        end = header_end + 64 if rng.random() < 0.7 else len(buf)
        return bytes(buf[: int(rng.integers(0, end))])
    if kind == 1:  # flip bytes in one region
        region = ["header", "header", "data"][int(rng.integers(3))]
        start, size = fields[region][0]
        for _ in range(int(rng.integers(1, 9))):
            buf[start + int(rng.integers(size))] ^= 1 << int(rng.integers(8))
        return bytes(buf)
    if kind in (2, 3):  # a boundary value in a count, length, dim, type or offset field
        names = ["count", "length", "array_count", "dim", "offset", "n_dims", "vtype", "ttype"]
        at, size = pick(names[int(rng.integers(len(names)))])
        value = INTERESTING[int(rng.integers(len(INTERESTING)))]
        if rng.random() < 0.3:
            value = len(data) + int(rng.integers(-64, 64))
        _put(buf, at, size, value)
        return bytes(buf)
    if kind == 4:  # the alignment (0, odd, huge) or a scalar's bytes
        if fields["alignment"] and rng.random() < 0.5:
            at, size = fields["alignment"][0]
            _put(buf, at, size, [0, 1, 3, 48, 1 << 20, (1 << 32) - 1][int(rng.integers(6))])
        else:
            at, size = pick("scalar")
            buf[at : at + size] = rng.bytes(size)
        return bytes(buf)
    if kind == 5:  # tensor data offsets: unaligned, overlapping, past the end
        at, size = pick("offset")
        (old,) = struct.unpack_from("<Q", buf, at)
        other = struct.unpack_from("<Q", buf, pick("offset")[0])[0]
        _put(
            buf,
            at,
            8,
            [old + 1, old - 32, other, other + 32, old + len(data)][int(rng.integers(5))],
        )
        return bytes(buf)
    if kind == 6:  # a duplicate tensor name: overwrite one name with another of its length
        names = fields["name"]
        a = names[int(rng.integers(len(names)))]
        same = [n for n in names if n[1] == a[1] and n != a]
        if same:
            b = same[int(rng.integers(len(same)))]
            buf[b[0] : b[0] + b[1]] = buf[a[0] : a[0] + a[1]]
        return bytes(buf)
    if kind == 7:  # insert or delete bytes inside the header
        at = int(rng.integers(header_end))
        n = int(rng.integers(1, 16))
        if rng.random() < 0.5:
            return bytes(buf[:at] + rng.bytes(n) + buf[at:])
        return bytes(buf[:at] + buf[at + n :])
    if kind == 8:  # random bytes over one field of any kind
        kinds = [k for k in fields if k not in ("header", "data") and fields[k]]
        at, size = pick(kinds[int(rng.integers(len(kinds)))])
        size = min(size, 64)
        buf[at : at + size] = rng.bytes(size)
        return bytes(buf)
    # several of the above at once
    for _ in range(int(rng.integers(2, 4))):
        if len(buf) < len(data):  # truncated or shortened: the field map no longer fits
            break
        buf = bytearray(mutate(bytes(buf), fields, rng))
    return bytes(buf)


ODD_VALUES: list[Any] = ["", "x", "NaN", -1, 0, 1, 3, 1 << 20, (1 << 31) - 1, (1 << 32) - 1,
    1 << 40, (1 << 64) - 1, -(1 << 63), float("nan"), float("inf"), -0.0, 1e30, 1e300, True,
    [], [0], [-1, 1 << 30], ["a", "b"], [0.5, float("nan")]]  # fmt: skip
KEYS = ["block_count", "embedding_length", "feed_forward_length", "attention.head_count",
    "attention.head_count_kv", "context_length", "attention.layer_norm_rms_epsilon",
    "rope.freq_base", "rope.dimension_count", "rope.scaling.type", "rope.scaling.factor",
    "attention.key_length", "attention.value_length", "vocab_size", "expert_count",
    "expert_used_count", "attention.sliding_window", "general.alignment", "general.file_type",
    "general.architecture", "general.name", "tokenizer.ggml.model", "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.eos_token_ids", "tokenizer.chat_template"]  # fmt: skip


def _entry(key: str, value: Any) -> bytes:
    """A metadata entry holding `value` with the narrowest GGUF type that takes it."""
    from gguf import GGUFValueType as V

    from herd.gguf.writer import kv_entry

    if isinstance(value, bool) or not isinstance(value, int | float):
        return kv_entry(key, value)
    if isinstance(value, float):
        return kv_entry(key, value, V.FLOAT32 if abs(value) < 1e38 else V.FLOAT64)
    if 0 <= value < 1 << 32:
        return kv_entry(key, value, V.UINT32)
    return kv_entry(key, value, V.UINT64 if value >= 0 else V.INT64)


def retype(path: Path, rng: np.random.Generator) -> bytes:
    """A well-formed file whose metadata holds a wrong-typed or odd value (or lacks a key):
    what passes the reader and must still be refused cleanly by the loaders."""
    from herd.gguf import open_gguf
    from herd.gguf.writer import GGUFStream

    g = open_gguf(path)
    kv = dict(g.kv)
    for _ in range(int(rng.integers(1, 3))):
        key = KEYS[int(rng.integers(len(KEYS)))]
        key = key if key.startswith(("general.", "tokenizer.")) else "llama." + key
        if rng.random() < 0.15:
            kv.pop(key, None)
            continue
        value = ODD_VALUES[int(rng.integers(len(ODD_VALUES)))]
        if isinstance(kv.get(key), list) and rng.random() < 0.5:  # wrong length, wrong items
            n = len(kv[key]) + int(rng.integers(-3, 2))
            value = kv[key][: max(n, 0)] if rng.random() < 0.5 else [value] * max(n, 1)
            value = value if not isinstance(value[0] if value else 0, list) else []
        kv[key] = value
    align = kv.get("general.alignment", 32)
    odd = not isinstance(align, int) or isinstance(align, bool) or align & (align - 1)
    if odd or not 1 <= align <= 4096:  # the writer would pad to it; mutate() covers these
        kv.pop("general.alignment")
        align = 32
    out = io.BytesIO()
    try:
        entries = [_entry(k, v) for k, v in kv.items()]
    except (TypeError, struct.error, OverflowError):
        return path.read_bytes()  # a value the writer cannot store: the seed as it is
    specs = [(t.name, t.shape, t.type) for t in g.tensors.values()]
    stream = GGUFStream(out.write, entries, specs, align)
    for t in g.tensors.values():
        stream.tensor(bytes(g.raw(t.name)))
    return out.getvalue()


# ---- one mutant ------------------------------------------------------------------------


def check(path: Path, backends: tuple[str, ...] = ("numpy", "ggml")) -> list[str]:
    """Run a file through everything that reads model files; return what loaded. A
    HerdError propagates (a clean refusal); anything else is a bug."""
    import herd
    from herd.cli.show import render_info
    from herd.gguf import open_gguf
    from herd.ml import available_backends
    from herd.store.facts import load_facts
    from herd.store.store import Store

    done = []
    g = open_gguf(path)
    done.append("read")
    try:
        text = render_info(
            load_facts(str(path), Store(Path(tempfile.gettempdir()) / "fuzz-store")), True
        )
        if len(text) > SHOW_LIMIT:
            raise AssertionError(f"herd show -v printed {len(text)} characters")
        done.append("show")
    except herd.HerdError:
        pass  # show may refuse what a load refuses too: go on to the loaders
    del g
    for name in backends:
        if name not in available_backends():
            continue
        try:
            llm = herd.load(path, backend=name)
        except herd.HerdError:
            continue
        try:
            llm.tokenize("hello the world")
            done.append(name)
        finally:
            llm.close() if hasattr(llm, "close") else None
    return done


def _preload() -> None:
    """Import what `check` uses before forking, so each child starts warm (imports only:
    no ggml backend, no threads, which a fork would not carry)."""
    import herd.api  # noqa: F401
    import herd.cli.show  # noqa: F401
    import herd.models.registry  # noqa: F401
    import herd.store.facts  # noqa: F401
    import herd.store.ggufinfo  # noqa: F401
    import herd.tokenizer  # noqa: F401
    from herd.ml import available_backends

    if "ggml" in available_backends():
        import herd.ml.backends.ggml.backend  # noqa: F401


def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def _child(path: Path, out: int) -> None:
    """In the forked child: bound memory, run the checks, report one JSON line, exit."""
    limit = _address_space() + MEM_FIXED + MEM_PER_BYTE * path.stat().st_size
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import warnings

    import herd

    warnings.simplefilter("ignore")  # NumPy's on NaN weights: loading them is no bug
    result: dict[str, Any]
    try:
        done = check(path)
        result = {"outcome": "load" if {"numpy", "ggml"} & set(done) else "clean", "done": done}
    except herd.HerdError as e:
        result = {"outcome": "clean", "error": str(e)[:200]}
    except MemoryError:
        result = {"outcome": "memory"}
    except BaseException as e:
        tb = traceback.extract_tb(e.__traceback__)
        frame = next((f for f in reversed(tb) if "/src/herd/" in f.filename), tb[-1])
        where = f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
        buf = io.StringIO()
        traceback.print_exception(e, file=buf)
        result = {"outcome": "traceback", "where": f"{type(e).__name__} at {where}",
                  "text": buf.getvalue()[-4000:]}  # fmt: skip
    os.write(out, (json.dumps(result) + "\n").encode())
    os._exit(0)


class Run:
    """Mutants through forked children, `workers` at a time."""

    def __init__(self, seed: int, workers: int, timeout: float, directory: Path) -> None:
        self.seed, self.workers, self.timeout, self.dir = seed, workers, timeout, directory
        self.seed_paths = seed_files(directory / "seeds")
        self.seeds = [p.read_bytes() for p in self.seed_paths]
        self.fields = [field_map(d) for d in self.seeds]
        self.counts: collections.Counter[str] = collections.Counter()
        self.places: dict[str, list[int]] = collections.defaultdict(list)  # bug -> mutants
        self.texts: dict[str, str] = {}
        self.stages: collections.Counter[str] = collections.Counter()  # what passed each step
        self.retry: list[int] = []  # hung once: run again at the end of the batch
        self.retried: set[int] = set()

    def mutant(self, i: int) -> bytes:
        rng = np.random.default_rng([self.seed, i])
        which = int(rng.integers(len(self.seeds)))
        if rng.random() < 0.3:
            return retype(self.seed_paths[which], rng)
        return mutate(self.seeds[which], self.fields[which], rng)

    def start(self, i: int) -> tuple[int, int, int, float, Path]:
        path = self.dir / f"mutant-{i}.gguf"
        path.write_bytes(self.mutant(i))
        sys.stdout.flush()  # or each child writes the buffer again
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                _child(path, w)
            finally:
                os._exit(70)
        os.close(w)
        return i, pid, r, time.monotonic(), path

    def finish(self, i: int, pid: int, r: int, status: int, path: Path, hung: bool) -> None:
        chunks: list[bytes] = []
        while ready := select.select([r], [], [], 0)[0]:
            chunk = os.read(ready[0], 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(r)
        text = b"".join(chunks).decode(errors="replace").strip()
        if hung and i not in self.retried:  # a busy machine can starve a child: once more
            self.retried.add(i)
            self.retry.append(i)
            path.unlink()
            return
        if hung:
            result = {"outcome": "hang", "where": "hang"}
        elif os.WIFSIGNALED(status):
            sig = signal.Signals(os.WTERMSIG(status)).name
            result = {"outcome": "crash", "where": f"killed by {sig}"}
        elif not text:
            result = {"outcome": "crash", "where": f"exit {os.WEXITSTATUS(status)}, no report"}
        else:
            result = json.loads(text.splitlines()[-1])
        outcome = result["outcome"]
        self.counts[outcome] += 1
        self.stages.update(result.get("done", []))
        if outcome in ("traceback", "hang", "crash", "memory"):
            where = result.get("where", outcome)
            self.places[where].append(i)
            self.texts.setdefault(where, result.get("text", ""))
            path.rename(self.dir / f"bug-{i}.gguf")  # kept for a look
        else:
            path.unlink()

    def run(self, indices: list[int]) -> None:
        running: list[tuple[int, int, int, float, Path]] = []
        todo = list(reversed(indices))
        while todo or running:
            while todo and len(running) < self.workers:
                running.append(self.start(todo.pop()))
            time.sleep(0.002)
            for job in list(running):
                i, pid, r, t0, path = job
                done, status = os.waitpid(pid, os.WNOHANG)
                hung = not done and time.monotonic() - t0 > self.timeout
                if hung:
                    os.kill(pid, signal.SIGKILL)
                    _, status = os.waitpid(pid, 0)
                if done or hung:
                    running.remove(job)
                    self.finish(i, pid, r, status, path, hung)
        if self.retry:
            again, self.retry = self.retry, []
            self.run(again)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mutants", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per mutant")
    ap.add_argument("--only", type=int, help="run mutant N in this process, traceback shown")
    ap.add_argument("--keep", type=Path, help="directory for the seeds and failing mutants")
    args = ap.parse_args()
    directory = args.keep or Path(tempfile.mkdtemp(prefix="herd-fuzz-"))
    directory.mkdir(parents=True, exist_ok=True)
    run = Run(args.seed, args.workers, args.timeout, directory)
    _preload()
    if args.only is not None:
        path = directory / f"mutant-{args.only}.gguf"
        path.write_bytes(run.mutant(args.only))
        print(path, check(path))
        return 0
    bound = f"{MEM_FIXED >> 20} MiB + {MEM_PER_BYTE}x the file's size"
    print(f"fuzz_gguf: seed {args.seed}, {args.mutants} mutants, {args.workers} workers, "
          f"{args.timeout:g} s and {bound} each")  # fmt: skip
    t0 = time.monotonic()
    step = max(1, args.mutants // 20)
    for start in range(0, args.mutants, step):
        run.run(list(range(start, min(start + step, args.mutants))))
        done = min(start + step, args.mutants)
        print(f"  {done} mutants, {time.monotonic() - t0:.0f} s: {dict(run.counts)}", flush=True)
    elapsed = time.monotonic() - t0
    c = run.counts
    print(f"\n{args.mutants} mutants in {elapsed:.0f} s ({1000 * elapsed / args.mutants:.0f} ms "
          f"each, {args.workers} workers), seed {args.seed}:")  # fmt: skip
    print(f"  clean errors  {c['clean']}\n  loads         {c['load']}  (passed each step: "
          f"{dict(run.stages)})")  # fmt: skip
    print(f"  tracebacks    {c['traceback']}\n  hangs         {c['hang']}")
    print(f"  over-bound allocations {c['memory']}\n  native crashes {c['crash']}")
    for where, ids in sorted(run.places.items(), key=lambda kv: -len(kv[1])):
        print(
            f"\n{len(ids)} x {where} (mutants {ids[:8]}; rerun: --seed {args.seed} --only {ids[0]})"
        )
        print("    " + run.texts[where].strip().replace("\n", "\n    ")[-1500:])
    print(f"\nfailing mutants kept in {directory}")
    bad = c["traceback"] + c["hang"] + c["memory"] + c["crash"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
