"""KV caches (docs/ARCHITECTURE.md, "kvcache")."""

from herd.kvcache.causal import Causal, ShiftFn
from herd.kvcache.encoder import Encoder
from herd.kvcache.wrapper import Wrapper

__all__ = ["Causal", "Encoder", "ShiftFn", "Wrapper"]
