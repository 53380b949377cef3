"""The sampling engine: continuous batching with a KV cache, any adapter per request, exact logprobs.

Public surface: `SamplingEngine` and its request/result types. See `engine.py` for the loop.
"""

from tether.engine.sampling.engine import SamplingEngine
from tether.engine.sampling.scheduler import SchedulerConfig
from tether.types.sample_request import SampledSequence, SampleRequest, SampleResult

__all__ = ["SampleRequest", "SampleResult", "SampledSequence", "SamplingEngine", "SchedulerConfig"]
