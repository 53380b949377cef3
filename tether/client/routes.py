"""The endpoints the SDK calls, as data: method, path, request type, and how the answer decodes.

A client method picks a `Route`, builds its body (a `tether.types.wire` model, or the protobuf
`ForwardBackwardRequestBody`) and hands both to `Transport.call`, which returns the route's typed
result. So every request the SDK makes is typed on the way out and on the way back, and the table
below is the whole of the protocol the SDK speaks (tinker-protocol.md §3; tether's extensions in
docs/ARCHITECTURE.md). This module knows nothing about HTTP, retries or polling (transport.py), nor
about sessions and seq ids (the clients).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from tether.client.wire_convert import forward_output_from_wire, sample_response_from_wire
from tether.types import data, proto
from tether.types import wire as w
from tether.types import wire_jobs as wj
from tether.types.data import ForwardBackwardOutput, SampleResponse
from tether.types.errors import ServerError
from tether.types.proto import ForwardBackwardRequestBody

T = TypeVar("T")
M = TypeVar("M", bound=w.WireModel)

Decoder = Callable[[Any, "w.UntypedAPIFuture | None"], T]
"""(answer, submit answer) -> result. The answer is the JSON value, or the protobuf bytes of a
`proto_result` route; the submit answer is the future handle of a `future` route (None otherwise)."""


@dataclass(frozen=True)
class Route(Generic[T]):
    """One endpoint as the SDK calls it."""

    method: Literal["GET", "POST", "PUT", "DELETE"]
    path: str
    """May hold `{name}` fields, filled by `at()`."""
    request: type | None
    """Type of the body: a WireModel (sent as JSON), ForwardBackwardRequestBody (sent as protobuf),
    or None where the protocol sends no body."""
    decode: Decoder[T] | None
    """The typed result of the answer; None where the protocol ignores the answer (the call returns None)."""
    future: bool = False
    """The route answers `{"request_id"}` and the result comes from `retrieve_future`."""
    proto_result: bool = False
    """The future's result is protobuf bytes (else JSON)."""
    raw_result: bool = False
    """The answer is a file: `decode` gets its bytes."""
    body_nbytes: Callable[[Any], int] | None = None
    """About how many bytes of tensors the body carries (None: always small); a large body is
    encoded off the SDK loop, as a large protobuf answer is decoded (`Transport.call`)."""

    def at(self, **ids: str) -> Route[T]:
        """This route with the `{name}` fields of its path filled (ids go in unescaped, §3.5)."""
        return dataclasses.replace(self, path=self.path.format(**ids))

    @property
    def proto_request(self) -> bool:
        return self.request is ForwardBackwardRequestBody


def _model(model: type[M]) -> Decoder[M]:
    def decode(answer: Any, submitted: w.UntypedAPIFuture | None) -> M:
        # A future that resolves to JSON null (an empty result) reads as an object without fields.
        return model.model_validate({} if answer is None else answer)

    return decode


def _forward_nbytes(body: ForwardBackwardRequestBody) -> int:
    total = 0
    for datum in body.data:
        total += sum(
            len(c.tokens) * 4 for c in datum.model_input_chunks if isinstance(c, proto.WireTextChunk)
        )
        total += sum(array.nbytes for array in datum.loss_fn_inputs.values())
    return total


def _grads_nbytes(body: w.BackwardFromLogprobGradsRequest) -> int:
    return sum(len(grad.data) for grad in body.logprob_grads) * 4


def _forward_output(answer: bytes, submitted: w.UntypedAPIFuture | None) -> ForwardBackwardOutput:
    return forward_output_from_wire(proto.decode_forward_backward_output(answer))


@dataclass(frozen=True)
class KeptGraph:
    """The answer of forward_keep_graph: the forward's output, and the id of the graph the server
    keeps for the backward (the request id of the forward)."""

    graph_id: str
    output: ForwardBackwardOutput


def _kept_graph(answer: bytes, submitted: w.UntypedAPIFuture | None) -> KeptGraph:
    if submitted is None:
        raise ServerError("forward_keep_graph answered without a request id")
    return KeptGraph(submitted.request_id, _forward_output(answer, submitted))


def _sample_response(answer: bytes, submitted: w.UntypedAPIFuture | None) -> SampleResponse:
    ids = submitted.sample_sequence_ids if submitted is not None else None
    return sample_response_from_wire(proto.decode_sample_response(answer), ids)


_V1 = "/api/v1"

# ---- service and session (§3.1)
CREATE_SESSION = Route(
    "POST", f"{_V1}/create_session", w.CreateSessionRequest, _model(w.CreateSessionResponse)
)
SESSION_HEARTBEAT: Route[None] = Route("POST", f"{_V1}/session_heartbeat", w.SessionHeartbeatRequest, None)
SESSION_FINISH: Route[None] = Route(
    "POST", f"{_V1}/sessions/{{session_id}}/finish", w.SessionFinishRequest, None
)
GET_SERVER_CAPABILITIES = Route(
    "GET", f"{_V1}/get_server_capabilities", None, _model(w.GetServerCapabilitiesResponse)
)

# ---- training (§3.2) and tether's one-pass custom loss
CREATE_MODEL = Route(
    "POST", f"{_V1}/create_model", w.CreateModelRequest, _model(w.CreateModelResponse), future=True
)
LOAD_WEIGHTS = Route(
    "POST", f"{_V1}/load_weights", w.LoadWeightsRequest, _model(w.LoadWeightsResponse), future=True
)
GET_INFO = Route("POST", f"{_V1}/get_info", w.GetInfoRequest, _model(w.GetInfoResponse))
FORWARD_BACKWARD = Route(
    "POST",
    f"{_V1}/forward_backward",
    ForwardBackwardRequestBody,
    _forward_output,
    future=True,
    proto_result=True,
    body_nbytes=_forward_nbytes,
)
FORWARD_KEEP_GRAPH = Route(
    "POST",
    f"{_V1}/tether/forward_keep_graph",
    ForwardBackwardRequestBody,
    _kept_graph,
    future=True,
    proto_result=True,
    body_nbytes=_forward_nbytes,
)
BACKWARD_FROM_LOGPROB_GRADS = Route(
    "POST",
    f"{_V1}/tether/backward_from_logprob_grads",
    w.BackwardFromLogprobGradsRequest,
    _model(w.BackwardFromLogprobGradsResponse),
    future=True,
    body_nbytes=_grads_nbytes,
)
OPTIM_STEP = Route("POST", f"{_V1}/optim_step", w.OptimStepRequest, _model(w.OptimStepResponse), future=True)
SAVE_WEIGHTS = Route(
    "POST", f"{_V1}/save_weights", w.SaveWeightsRequest, _model(w.SaveWeightsResponse), future=True
)
SAVE_WEIGHTS_FOR_SAMPLER = Route(
    "POST",
    f"{_V1}/save_weights_for_sampler",
    w.SaveWeightsForSamplerRequest,
    _model(data.SaveWeightsForSamplerResponse),  # the named form: `path` is required
    future=True,
)
SAVE_WEIGHTS_FOR_SAMPLER_EXT = Route(
    "POST",
    f"{_V1}/tether/save_weights_for_sampler_ext",
    w.SaveWeightsForSamplerExtRequest,
    _model(w.SaveWeightsForSamplerExtResponse),
    future=True,
)
SAVE_WEIGHTS_FOR_SAMPLING_SESSION = Route(
    "POST",
    f"{_V1}/save_weights_for_sampler",
    w.SaveWeightsForSamplerRequest,
    _model(w.SaveWeightsForSamplerResponse),  # the ephemeral form: a `sampling_session_id`
    future=True,
)

# ---- sampling (§3.3)
CREATE_SAMPLING_SESSION = Route(
    "POST",
    f"{_V1}/create_sampling_session",
    w.CreateSamplingSessionRequest,
    _model(w.CreateSamplingSessionResponse),
)
SAMPLE = Route("POST", f"{_V1}/asample", w.SampleRequest, _sample_response, future=True, proto_result=True)
GET_SAMPLER = Route("GET", f"{_V1}/samplers/{{sampler_id}}", None, _model(w.GetSamplerResponse))

# ---- futures (§4): only Transport.call posts here, while it waits for a `future` route's result
RETRIEVE_FUTURE: Route[None] = Route("POST", f"{_V1}/retrieve_future", w.FutureRetrieveRequest, None)

# ---- the REST catalogue (§3.5)
_RUN = f"{_V1}/training_runs/{{training_run_id}}"
_CHECKPOINT = f"{_RUN}/checkpoints/{{checkpoint_id}}"
GET_TRAINING_RUN = Route("GET", _RUN, None, _model(w.TrainingRun))
TOKENIZER_FILES = Route(
    "GET", f"{_V1}/tether/tokenizer/{{base_model}}/files", None, _model(w.TokenizerFilesResponse)
)
TOKENIZER_FILE = Route(
    "GET",
    f"{_V1}/tether/tokenizer/{{base_model}}/files/{{name}}",
    None,
    lambda answer, _: answer,
    raw_result=True,
)
LOG_METRICS: Route[None] = Route("POST", f"{_V1}/tether/runs/{{run_id}}/metrics", w.LogMetricsRequest, None)
LIST_TRAINING_RUNS = Route("GET", f"{_V1}/training_runs", None, _model(w.TrainingRunsResponse))
LIST_CHECKPOINTS = Route("GET", f"{_RUN}/checkpoints", None, _model(w.CheckpointsListResponse))
LIST_USER_CHECKPOINTS = Route("GET", f"{_V1}/checkpoints", None, _model(w.CheckpointsListResponse))
WEIGHTS_INFO = Route("POST", f"{_V1}/weights_info", w.WeightsInfoRequest, _model(w.WeightsInfoResponse))
DELETE_CHECKPOINT: Route[None] = Route("DELETE", _CHECKPOINT, None, None)
SET_CHECKPOINT_TTL: Route[None] = Route("PUT", f"{_CHECKPOINT}/ttl", w.SetCheckpointTtlRequest, None)
PUBLISH_CHECKPOINT: Route[None] = Route(
    "POST", f"{_CHECKPOINT}/publish", None, None
)  # the protocol sends no body
UNPUBLISH_CHECKPOINT: Route[None] = Route("DELETE", f"{_CHECKPOINT}/publish", None, None)
LIST_SESSIONS = Route("GET", f"{_V1}/sessions", None, _model(w.ListSessionsResponse))
GET_SESSION = Route("GET", f"{_V1}/sessions/{{session_id}}", None, _model(w.GetSessionResponse))

# ---- dedicated trainer jobs (the control plane, tether/server/routes_jobs.py)
_JOBS = "/training/v1/trainerJobs"
_JOB = f"{_JOBS}/{{job_id}}"
CREATE_TRAINER_JOB = Route("POST", _JOBS, wj.TrainerJobConfig, _model(wj.TrainerJob))
LIST_TRAINER_JOBS = Route("GET", _JOBS, None, _model(wj.TrainerJobsResponse))
GET_TRAINER_JOB = Route("GET", _JOB, None, _model(wj.TrainerJob))
DELETE_TRAINER_JOB = Route("DELETE", _JOB, None, _model(wj.TrainerJob))
RESUME_TRAINER_JOB = Route("POST", f"{_JOB}:resume", None, _model(wj.TrainerJob))
CANCEL_TRAINER_JOB = Route("POST", f"{_JOB}:cancel", None, _model(wj.TrainerJob))
TRAINER_JOB_HEALTHZ: Route[None] = Route("GET", f"{_JOB}/api/v1/healthz", None, None)
LIST_JOB_CHECKPOINTS = Route("GET", f"{_JOB}/checkpoints", None, _model(wj.JobCheckpointsResponse))
DELETE_JOB_CHECKPOINT: Route[None] = Route(
    "POST", f"{_JOB}/checkpoints:delete", wj.DeleteJobCheckpointRequest, None
)
PROMOTE_JOB_CHECKPOINT = Route(
    "POST", f"{_JOB}/checkpoints:promote", wj.PromoteCheckpointRequest, _model(wj.ExportedModel)
)
EXPORT_MERGED_JOB_CHECKPOINT = Route(
    "POST", f"{_JOB}/checkpoints:exportMerged", wj.ExportMergedRequest, _model(wj.ExportedModel)
)
