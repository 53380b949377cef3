"""The sampling engine: continuous batching with a KV cache, any adapter per request, exact logprobs.

Public surface: `SamplingEngine` and its request/result types. See `engine.py` for the loop.
"""

from tether.engine.sampling.engine import SamplingEngine
from tether.engine.sampling.request import SampledSequence, SampleRequest, SampleResult
from tether.engine.sampling.scheduler import SchedulerConfig

__all__ = ["SampleRequest", "SampleResult", "SampledSequence", "SamplingEngine", "SchedulerConfig"]
