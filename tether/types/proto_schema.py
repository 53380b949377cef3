"""The `tinker_public` proto3 schema, built in code from `descriptor_pb2`.

Field numbers and types follow tinker-protocol.md §6 exactly: the official SDK encodes
`ForwardBackwardRequest` and decodes `ForwardBackwardOutput` / `SampleResponse` with them, so one
wrong number here breaks the wire. `tests/types/test_proto_schema.py` compares every field with the
SDK's own descriptor.

The schema lives in a private `DescriptorPool`, not the default one: a process that also imports
the official SDK (tests, a user's script) already has `tinker_public.*` registered there, and
proto refuses two files defining the same full names in one pool.

This module only knows message shapes; the codecs that turn them into plain dataclasses live in
`tether.types.proto`.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "tinker_public"

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "bytes": _F.TYPE_BYTES,
    "string": _F.TYPE_STRING,
    "int32": _F.TYPE_INT32,
    "int64": _F.TYPE_INT64,
    "uint32": _F.TYPE_UINT32,
    "uint64": _F.TYPE_UINT64,
    "bool": _F.TYPE_BOOL,
    "double": _F.TYPE_DOUBLE,
    "float": _F.TYPE_FLOAT,
}
_ENUMS = {"StopReason", "DType"}

# (name, number, type, modifier) per message; modifier: "" (singular), "repeated", "optional"
# (proto3 explicit presence), "oneof:<name>" (member of a real oneof) or "map:<key>" (map with
# the given key type; `type` is then the value type).
_MESSAGES: dict[str, list[tuple[str, int, str, str]]] = {
    "SampleResponse": [
        ("sequences", 1, "SampledSequence", "repeated"),
        ("prompt_logprobs", 2, "bytes", "optional"),
        ("topk_prompt_logprobs", 3, "TopkLogprobs", "optional"),
        ("prompt_cache_hit_tokens", 4, "int32", ""),
        ("target_prompt_logprobs", 5, "Tensor", "optional"),
        ("prompt_alt_tokens", 6, "PromptAltTokens", "optional"),
    ],
    "PromptAltTokens": [
        ("tokens", 1, "Tensor", ""),
        ("logprobs", 2, "Tensor", ""),
    ],
    "SampledSequence": [
        ("stop_reason", 1, "StopReason", ""),
        ("tokens", 2, "bytes", ""),
        ("logprobs", 3, "bytes", "optional"),
        ("topk_sampled_logprobs", 4, "TopkLogprobs", "optional"),
    ],
    "TopkLogprobs": [
        ("token_ids", 1, "bytes", ""),
        ("logprobs", 2, "bytes", ""),
        ("k", 3, "uint32", ""),
        ("length", 4, "uint32", ""),
    ],
    "SparseCsr": [
        ("values", 1, "bytes", ""),
        ("crow_indices", 2, "bytes", ""),
        ("col_indices", 3, "bytes", ""),
    ],
    "Tensor": [
        ("dense", 1, "bytes", "oneof:encoding"),
        ("sparse_csr", 2, "SparseCsr", "oneof:encoding"),
        ("dtype", 3, "DType", ""),
        ("shape", 4, "int64", "repeated"),
    ],
    "BatchedTensor": [
        ("data", 1, "bytes", ""),
        ("offsets", 2, "bytes", ""),
        ("dtype", 3, "DType", ""),
        ("trailing_shape", 4, "int64", "repeated"),
    ],
    "ArrayRecord": [
        ("type_tag", 1, "string", ""),
        ("fields", 2, "BatchedTensor", "map:string"),
        ("num_datums", 3, "int64", ""),
    ],
    "ForwardBackwardOutput": [
        ("loss_fn_output_type", 1, "string", ""),
        ("loss_fn_outputs", 2, "ArrayRecord", "repeated"),
        ("metrics", 3, "double", "map:string"),
    ],
    "ForwardBackwardRequest": [
        ("model_id", 1, "string", ""),
        ("seq_id", 2, "int32", ""),
        ("data", 3, "Datum", "repeated"),
        ("loss_fn", 4, "string", ""),
        ("loss_fn_config", 5, "double", "map:string"),
        ("forward_only", 6, "bool", ""),
        ("loss_fn_config_v2", 7, "LossConfigValue", "map:string"),
    ],
    "LossConfigValue": [
        ("number", 1, "double", "oneof:value"),
        ("text", 2, "string", "oneof:value"),
    ],
    "Datum": [
        ("model_input", 1, "Chunk", "repeated"),
        ("loss_fn_inputs", 2, "Tensor", "map:string"),
        ("model_input_spans", 3, "ProvenanceSpan", "repeated"),
        ("loss_fn_input_spans", 4, "ProvenanceSpan", "repeated"),
    ],
    "ProvenanceSpan": [
        ("prompt_tokens", 1, "PromptProvenanceSpan", "oneof:span"),
        ("sampled_tokens", 2, "SampledProvenanceSpan", "oneof:span"),
    ],
    "PromptProvenanceSpan": [
        ("sequence_id", 1, "string", ""),
        ("offset", 2, "int64", ""),
        ("length", 3, "int64", ""),
    ],
    "SampledProvenanceSpan": [
        ("sequence_id", 1, "string", ""),
        ("offset", 2, "int64", ""),
        ("length", 3, "int64", ""),
    ],
    "Chunk": [
        ("encoded_text", 1, "EncodedTextChunk", "oneof:chunk"),
        ("image", 2, "ImageChunk", "oneof:chunk"),
        ("dmel", 3, "DmelChunk", "oneof:chunk"),
    ],
    "EncodedTextChunk": [("tokens", 1, "bytes", "")],
    "ImageChunk": [
        ("data", 1, "bytes", ""),
        ("format", 2, "string", ""),
        ("expected_tokens", 3, "int32", "optional"),
        ("override_dimensions", 4, "ImageDimensions", "optional"),
    ],
    "ImageDimensions": [
        ("width", 1, "uint32", ""),
        ("height", 2, "uint32", ""),
    ],
    "DmelChunk": [("dmel", 1, "bytes", "")],
    "SamplingParams": [
        ("max_tokens", 1, "int32", "optional"),
        ("seed", 2, "uint64", "optional"),
        ("temperature", 3, "float", "optional"),
        ("top_k", 4, "int32", "optional"),
        ("top_p", 5, "float", "optional"),
        ("stop_strs", 6, "StopStrings", "oneof:stop"),
        ("stop_tokens", 7, "StopTokens", "oneof:stop"),
    ],
    "StopStrings": [("values", 1, "string", "repeated")],
    "StopTokens": [("values", 1, "int32", "repeated")],
}

_ENUM_VALUES = {
    "StopReason": [("STOP_REASON_STOP", 0), ("STOP_REASON_LENGTH", 1)],
    "DType": [
        ("DTYPE_UNSPECIFIED", 0),
        ("DTYPE_FLOAT32", 1),
        ("DTYPE_INT64", 2),
        ("DTYPE_INT32", 3),
        ("DTYPE_BFLOAT16", 4),
    ],
}


def _set_type(field: descriptor_pb2.FieldDescriptorProto, type_name: str) -> None:
    if type_name in _SCALARS:
        field.type = _SCALARS[type_name]
    elif type_name in _ENUMS:
        field.type = _F.TYPE_ENUM
        field.type_name = f".{PACKAGE}.{type_name}"
    else:
        field.type = _F.TYPE_MESSAGE
        field.type_name = f".{PACKAGE}.{type_name}"


def _camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


def _add_message(
    file: descriptor_pb2.FileDescriptorProto, name: str, fields: list[tuple[str, int, str, str]]
) -> None:
    msg = file.message_type.add(name=name)
    real_oneofs: list[str] = [m.split(":", 1)[1] for _, _, _, m in fields if m.startswith("oneof:")]
    real_oneofs = list(dict.fromkeys(real_oneofs))
    for oneof in real_oneofs:
        msg.oneof_decl.add(name=oneof)
    # proto3 `optional` is a synthetic one-member oneof; synthetic oneofs must follow the real ones.
    synthetic_index = len(real_oneofs)
    for field_name, number, type_name, modifier in fields:
        field = msg.field.add(
            name=field_name, number=number, json_name=_camel(field_name)[:1].lower() + _camel(field_name)[1:]
        )
        field.label = _F.LABEL_OPTIONAL
        if modifier == "repeated":
            field.label = _F.LABEL_REPEATED
            _set_type(field, type_name)
        elif modifier == "optional":
            _set_type(field, type_name)
            field.proto3_optional = True
            msg.oneof_decl.add(name=f"_{field_name}")
            field.oneof_index = synthetic_index
            synthetic_index += 1
        elif modifier.startswith("oneof:"):
            _set_type(field, type_name)
            field.oneof_index = real_oneofs.index(modifier.split(":", 1)[1])
        elif modifier.startswith("map:"):
            entry_name = f"{_camel(field_name)}Entry"
            entry = msg.nested_type.add(name=entry_name)
            entry.options.map_entry = True
            key = entry.field.add(name="key", number=1, label=_F.LABEL_OPTIONAL, json_name="key")
            _set_type(key, modifier.split(":", 1)[1])
            value = entry.field.add(name="value", number=2, label=_F.LABEL_OPTIONAL, json_name="value")
            _set_type(value, type_name)
            field.label = _F.LABEL_REPEATED
            field.type = _F.TYPE_MESSAGE
            field.type_name = f".{PACKAGE}.{name}.{entry_name}"
        else:
            _set_type(field, type_name)


def build_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """The `tinker_public` schema as a FileDescriptorProto (file name `tether/tinker_public.proto`)."""
    file = descriptor_pb2.FileDescriptorProto(
        name="tether/tinker_public.proto", package=PACKAGE, syntax="proto3"
    )
    for enum_name, values in _ENUM_VALUES.items():
        enum = file.enum_type.add(name=enum_name)
        for value_name, number in values:
            enum.value.add(name=value_name, number=number)
    for name, fields in _MESSAGES.items():
        _add_message(file, name, fields)
    return file


POOL = descriptor_pool.DescriptorPool()
POOL.Add(build_file_descriptor())
# Looked up rather than taken from `Add`, which returns None on protobuf's pure-python backend.
FILE_DESCRIPTOR = POOL.FindFileByName("tether/tinker_public.proto")


def message_class(name: str) -> type[Any]:
    """The generated message class for `tinker_public.<name>` from tether's private pool.

    Typed `type[Any]`: the classes (a `Message` subclass each) get their fields at run time, so a
    type checker cannot know them.
    """
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


SampleResponse = message_class("SampleResponse")
SampledSequence = message_class("SampledSequence")
TopkLogprobs = message_class("TopkLogprobs")
Tensor = message_class("Tensor")
BatchedTensor = message_class("BatchedTensor")
ArrayRecord = message_class("ArrayRecord")
ForwardBackwardOutput = message_class("ForwardBackwardOutput")
ForwardBackwardRequest = message_class("ForwardBackwardRequest")
Datum = message_class("Datum")
Chunk = message_class("Chunk")

STOP_REASON_STOP = 0
STOP_REASON_LENGTH = 1
DTYPE_UNSPECIFIED = 0
DTYPE_FLOAT32 = 1
DTYPE_INT64 = 2
DTYPE_INT32 = 3
DTYPE_BFLOAT16 = 4
