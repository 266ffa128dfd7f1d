"""The API's OpenAPI 3.1 document, generated from the same msgspec structs that validate bodies."""

from __future__ import annotations

import msgspec

from dopd.protocol import ChatBody, CompletionBody, RolesBody

_ERROR = {"description": "an OpenAI-style error", "content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "object", "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {}, "code": {}}}}}}}}


def _post(summary: str, ref: str) -> dict:
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": ref}}}},
        "responses": {"200": {"description": "the result (JSON, or an SSE stream when stream is true)"},
                      "400": _ERROR, "401": _ERROR, "413": _ERROR, "429": _ERROR,
                      "500": {**_ERROR, "description": "the request failed on our side (a worker was lost, a KV "
                              "handoff or the request timed out); in a stream this is an error event"},
                      "503": {**_ERROR, "description": "the server is shutting down"}},
    }}


def _get(summary: str) -> dict:
    return {"get": {"summary": summary, "responses": {"200": {"description": "JSON"}, "401": _ERROR}}}


def schema(model_name: str) -> dict:
    (_, components) = msgspec.json.schema_components([CompletionBody, ChatBody, RolesBody],
                                                     ref_template="#/components/schemas/{name}")
    return {
        "openapi": "3.1.0",
        "info": {"title": "DOPD", "version": "1", "description": f"OpenAI-compatible API serving {model_name}"},
        "paths": {
            "/v1/completions": _post("text completion", "#/components/schemas/CompletionBody"),
            "/v1/chat/completions": _post("chat completion", "#/components/schemas/ChatBody"),
            "/v1/cluster/roles": _post("move workers between roles", "#/components/schemas/RolesBody"),
            "/v1/models": _get("the served model"),
            "/v1/cluster": _get("a snapshot of the workers, queues, latency and role changes"),
            "/health": _get("liveness"),
            "/metrics": _get("Prometheus metrics"),
        },
        "components": {"schemas": components},
    }
