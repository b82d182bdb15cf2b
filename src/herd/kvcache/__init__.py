"""KV caches (DESIGN.md §4 "kvcache")."""

from herd.kvcache.causal import Causal, ShiftFn

__all__ = ["Causal", "ShiftFn"]
