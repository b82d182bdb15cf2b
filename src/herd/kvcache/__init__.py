"""KV caches (DESIGN.md §4 "kvcache")."""

from herd.kvcache.causal import Causal, ShiftFn
from herd.kvcache.wrapper import Wrapper

__all__ = ["Causal", "ShiftFn", "Wrapper"]
