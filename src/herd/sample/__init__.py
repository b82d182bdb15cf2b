"""Token sampling: pure transforms over a logits row, and the `Sampler` that orders them."""

from herd.sample.logprobs import logprobs
from herd.sample.sampler import Sampler

__all__ = ["Sampler", "logprobs"]
