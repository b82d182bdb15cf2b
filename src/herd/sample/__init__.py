"""Token sampling: pure transforms over a logits row, and the `Sampler` that orders them."""

from herd.sample.logprobs import logprobs
from herd.sample.sampler import Constraint, Sampler

__all__ = ["Constraint", "Sampler", "logprobs"]
