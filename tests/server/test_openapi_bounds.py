"""Class guard over the live app's OpenAPI schema: every integer a client can send is bounded.

Query and path parameters and every request body (the wire models as the app publishes them);
an unbounded integer reaches SQLite, numpy or torch as an overflow, which is a server error.
"""

from __future__ import annotations

from tether.server.config import ServerConfig
from tether.server.main import create_app


def _unbounded(schema: dict, components: dict, where: str, seen: set[str]) -> list[str]:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        if name in seen:
            return []
        return _unbounded(components[name], components, where, seen | {name})
    found = []
    if schema.get("type") == "integer":
        has_low = "minimum" in schema or "exclusiveMinimum" in schema
        has_high = "maximum" in schema or "exclusiveMaximum" in schema
        if not (has_low and has_high):
            found.append(where)
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key, []):
            found += _unbounded(sub, components, where, seen)
    for name, sub in schema.get("properties", {}).items():
        found += _unbounded(sub, components, f"{where}.{name}", seen)
    if isinstance(schema.get("items"), dict):
        found += _unbounded(schema["items"], components, f"{where}[]", seen)
    if isinstance(schema.get("additionalProperties"), dict):
        found += _unbounded(schema["additionalProperties"], components, f"{where}{{}}", seen)
    return found


def test_every_integer_parameter_and_body_field_is_bounded(tmp_path):
    spec = create_app(ServerConfig(port=0, data_dir=tmp_path)).openapi()
    components = spec.get("components", {}).get("schemas", {})
    unbounded = []
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            where = f"{method.upper()} {path}"
            for param in operation.get("parameters", []):
                unbounded += _unbounded(
                    param.get("schema", {}), components, f"{where} {param['name']}", set()
                )
            for content in operation.get("requestBody", {}).get("content", {}).values():
                unbounded += _unbounded(content.get("schema", {}), components, f"{where} body", set())
    assert unbounded == []
