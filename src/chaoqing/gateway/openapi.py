"""The OpenAPI 3.1 document of the gateway's HTTP API (served at ``/openapi.json``).

Kept next to nothing else on purpose: a test validates real responses against it, and
schemathesis drives the running gateway from it.
"""

from __future__ import annotations

from typing import Any

from chaoqing import __version__
from chaoqing.config import Config

__all__ = ["ERROR_CODES", "openapi_document"]

ERROR_CODES = (
    "invalid_image", "invalid_parameter", "unauthorized", "image_too_large", "unsupported_media_type",
    "request_timeout", "not_found", "method_not_allowed", "invalid_request", "model_error", "model_unavailable",
    "overloaded", "deadline_exceeded", "internal_error",
    "job_not_found", "job_not_finished", "job_has_no_result", "spool_full", "estimate_exceeds_deadline",
)
JOB_STATUSES = ("queued", "running", "done", "failed", "cancelled")
JOB_STAGES = ("decode", "enhance", "composite", "encode")

IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")
UPLOAD_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff")


def _error_response(description: str, retry_after: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if retry_after:
        response["headers"] = {
            "Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "string"}}
        }
    return response


def _json(schema: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}


def _job_paths(config: Config, enhance_parameters: list[Any], upload_body: dict[str, Any],
               image_headers: dict[str, Any], security: list[dict[str, list[str]]]) -> dict[str, Any]:
    """/v1/jobs and /v1/jobs/{job_id}[/result|/events] (docs/jobs.md)."""
    jobs = config.jobs
    job_id = {"name": "job_id", "in": "path", "required": True, "description": "The id POST /v1/jobs gave",
              "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}
    not_found = _error_response("job_not_found: no such job, or another API key's")
    unauthorized = _error_response("unauthorized: API key missing or wrong")
    return {
        "/v1/jobs": {
            "post": {
                "operationId": "createJob",
                "summary": "Enhance one photo in the background; follow it at Location",
                "description": (
                    "The same parameters and body as /v1/enhance. The job's own limits: "
                    f"{jobs.max_body_bytes} bytes, {jobs.max_input_pixels} input pixels, {jobs.max_output_pixels} "
                    f"output pixels, {jobs.deadline_s:g} s per run. Results are kept {jobs.result_ttl_s:g} s."
                ),
                "security": security,
                "parameters": enhance_parameters,
                "requestBody": upload_body,
                "responses": {
                    "202": {
                        "description": "Accepted: queued",
                        "headers": {"Location": {"description": "/v1/jobs/{job_id}", "schema": {"type": "string"}},
                                    "X-Request-Id": {"schema": {"type": "string"}}},
                        "content": _json("Job"),
                    },
                    "400": _error_response("invalid_image or invalid_parameter"),
                    "401": unauthorized,
                    "408": _error_response("request_timeout: the upload did not arrive in time"),
                    "413": _error_response("image_too_large: over the job limits, or larger than the whole spool"),
                    "415": _error_response("unsupported_media_type"),
                    "500": _error_response("internal_error"),
                    "503": _error_response("spool_full: the spool is at max_jobs or max_bytes", retry_after=True),
                },
            }
        },
        "/v1/jobs/{job_id}": {
            "parameters": [job_id],
            "get": {
                "operationId": "getJob",
                "summary": "The job: status, progress (stage, tiles, faces, elapsed, ETA), result or error",
                "security": security,
                "responses": {"200": {"description": "The job", "content": _json("Job")},
                              "401": unauthorized, "404": not_found},
            },
            "delete": {
                "operationId": "deleteJob",
                "summary": "Cancel a queued or running job (it keeps its state until it expires); delete a finished one",
                "security": security,
                "responses": {
                    "200": {"description": "Cancelled", "content": _json("Job")},
                    "202": {"description": "Cancel asked of the gateway running it, not yet confirmed",
                            "content": _json("Job")},
                    "204": {"description": "The finished job and its result are deleted"},
                    "401": unauthorized,
                    "404": not_found,
                },
            },
        },
        "/v1/jobs/{job_id}/result": {
            "parameters": [job_id],
            "get": {
                "operationId": "getJobResult",
                "summary": "The enhanced photo of a done job",
                "security": security,
                "responses": {
                    "200": {"description": "The enhanced photo", "headers": image_headers,
                            "content": {media_type: {"schema": {"type": "string",
                                                                "contentMediaType": "application/octet-stream"}}
                                        for media_type in IMAGE_TYPES}},
                    "401": unauthorized,
                    "404": not_found,
                    "409": _error_response("job_not_finished (queued or running; Retry-After), or "
                                           "job_has_no_result (failed or cancelled)", retry_after=True),
                },
            },
        },
        "/v1/jobs/{job_id}/events": {
            "parameters": [job_id],
            "get": {
                "operationId": "getJobEvents",
                "summary": "The job as Server-Sent Events: 'progress' at each change, then 'done', 'failed' or "
                           "'cancelled'; each event's data is the Job",
                "security": security,
                "responses": {
                    "200": {"description": "text/event-stream until the job ends",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                    "401": unauthorized,
                    "404": not_found,
                    "503": _error_response("overloaded: too many event streams open", retry_after=True),
                },
            },
        },
    }


def _job_schemas() -> dict[str, Any]:
    nullable_int = {"type": ["integer", "null"]}
    counter = {"type": "object", "required": ["done", "total"],
               "properties": {"done": {"type": "integer"}, "total": nullable_int}}
    time_or_null = {"type": ["string", "null"], "format": "date-time"}
    return {
        "Job": {
            "type": "object",
            "required": ["id", "status", "created", "started", "finished", "expires", "parameters", "input",
                         "progress", "attempts", "error", "result", "links"],
            "properties": {
                "id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                "status": {"type": "string", "enum": list(JOB_STATUSES)},
                "created": {"type": "string", "format": "date-time"},
                "started": time_or_null,
                "finished": time_or_null,
                "expires": {**time_or_null, "description": "When a finished job is removed"},
                "parameters": {"type": "object", "description": "As given to POST (defaults filled in)"},
                "input": {"type": "object", "required": ["media_type", "bytes", "width", "height"], "properties": {
                    "media_type": {"type": "string"}, "bytes": {"type": "integer"},
                    "width": {"type": "integer"}, "height": {"type": "integer"}}},
                "progress": {
                    "type": "object",
                    "required": ["stage", "tiles", "faces", "elapsed_s", "eta_s", "eta_basis"],
                    "properties": {
                        "stage": {"enum": [*JOB_STAGES, None]},
                        "tiles": {"oneOf": [{"type": "null"}, counter],
                                  "description": "The background's model calls; null before they are planned"},
                        "faces": {"oneOf": [{"type": "null"}, counter],
                                  "description": "null: faces are not enhanced; total null: not detected yet"},
                        "elapsed_s": {"type": ["number", "null"]},
                        "eta_s": {"type": ["number", "null"], "description": "Seconds left; null when unknown"},
                        "eta_basis": {"enum": ["measured", "estimate", None]},
                    },
                },
                "attempts": {"type": "integer", "description": "Runs started"},
                "error": {"oneOf": [{"type": "null"}, {
                    "type": "object", "required": ["code", "message", "status"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                                   "status": {"type": "integer"}}}]},
                "result": {"oneOf": [{"type": "null"}, {
                    "type": "object",
                    "required": ["media_type", "bytes", "width", "height", "faces_detected", "faces_enhanced",
                                 "faces_over_limit", "timings_ms"],
                    "properties": {
                        "media_type": {"type": "string"}, "bytes": {"type": "integer"},
                        "width": {"type": "integer"}, "height": {"type": "integer"},
                        "faces_detected": {"type": ["integer", "null"], "description": "null: detection was skipped"},
                        "faces_enhanced": {"type": "integer"},
                        "faces_over_limit": {"type": "integer"},
                        "timings_ms": {"type": "object", "additionalProperties": {"type": "number"}},
                        "faces_identity": {"type": "array", "items": IDENTITY_CHECK_SCHEMA,
                                           "description": "the identity guard's report per face it checked"},
                    }}]},
                "links": {"type": "object", "required": ["self", "result", "events"], "properties": {
                    "self": {"type": "string"}, "result": {"type": "string"}, "events": {"type": "string"}}},
            },
        },
    }


IDENTITY_CHECK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["face", "guarded", "distance_before", "distance_after", "strength", "requested_strength"],
    "properties": {
        "face": {"type": "integer", "description": "the face's index in the detector's answer"},
        "guarded": {"type": "boolean", "description": "blended back: strength is below requested_strength"},
        "distance_before": {"type": "number", "description": "descriptor distance at the requested strength"},
        "distance_after": {"type": "number", "description": "descriptor distance at the strength applied"},
        "strength": {"type": "number", "description": "the face strength it was composited with"},
        "requested_strength": {"type": "number"},
    },
}


def openapi_document(config: Config) -> dict[str, Any]:
    """The document for a gateway configured with ``config`` (defaults and limits filled in)."""
    binary = {"type": "string", "contentMediaType": "application/octet-stream"}
    limits = config.limits
    enhance_parameters = [
        {"name": "scale", "in": "query", "description": "Output size over input size, 1 to 4.",
         "schema": {"type": "number", "minimum": 1, "maximum": 4, "default": config.scale}},
        {"name": "faces", "in": "query", "description": "Enhance faces (presets with a face model).",
         "schema": {"type": "boolean", "default": True}},
        {"name": "preset", "in": "query", "description": "; ".join(f"{p.name}: {p.description}" for p in config.presets.values()),
         "schema": {"type": "string", "enum": list(config.presets), "default": config.preset}},
        {"name": "format", "in": "query",
         "description": "Output format; default: jpeg for JPEG input, webp for WebP, png for everything else "
                        "(and for 16-bit input).",
         "schema": {"type": "string", "enum": ["png", "jpeg", "webp"]}},
        {"name": "quality", "in": "query", "description": "JPEG/WebP quality (100 = lossless WebP).",
         "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
        {"name": "strip_metadata", "in": "query",
         "description": "Write no EXIF, XMP or ICC profile (8-bit colours are converted to sRGB first). "
                        "Otherwise all three are carried, EXIF and XMP with orientation 1 and the output's size.",
         "schema": {"type": "boolean", "default": config.encode.strip_metadata}},
        {"name": "strip_gps", "in": "query",
         "description": "Carry EXIF and XMP without their GPS positions (EXIF's GPS IFD, XMP's GPS* properties).",
         "schema": {"type": "boolean", "default": config.encode.strip_gps}},
        {"name": "face_strength", "in": "query",
         "description": "How much of the face model's face to paste, 0 to 1: the rest is the background's own "
                        "upscaled face. Default: the preset's (" + ", ".join(
                            f"{p.name} {p.face_strength:g}" for p in config.presets.values() if p.face_model) + ").",
         "schema": {"type": "number", "minimum": 0, "maximum": 1}},
        {"name": "face_fidelity", "in": "query",
         "description": "For a face restorer with a fidelity weight (CodeFormer's): 0 restores most, 1 keeps the "
                        "input face closest. Default: the preset's, else the model's ([models.NAME] weight, 0.5). "
                        "Models without the weight ignore it.",
         "schema": {"type": "number", "minimum": 0, "maximum": 1}},
        {"name": "face_colour", "in": "query",
         "description": "Give each enhanced face the photo's own colours (skin, irises). Default: the preset's.",
         "schema": {"type": "boolean"}},
        {"name": "face_texture", "in": "query",
         "description": "Continue the photo's grain into each enhanced face. Default: the preset's.",
         "schema": {"type": "boolean"}},
        {"name": "identity_guard", "in": "query",
         "description": "Compare each restored face with the input face (dlib's face descriptor) and blend it "
                        "back toward the background's face until their distance is at most "
                        f"{config.identity_guard.threshold:g} ([identity_guard] threshold). Default: the preset's "
                        "(on for presets whose face model is a face restorer: " + (", ".join(
                            p.name for p in config.presets.values() if config.identity_guard_for(p.name)) or "none here")
                        + "). The X-Faces-Identity headers report it per face.",
         "schema": {"type": "boolean"}},
        {"name": "X-Request-Id", "in": "header", "required": False,
         "description": "Echoed back when it is 1-64 characters of [A-Za-z0-9._:-]; generated otherwise.",
         "schema": {"type": "string"}},
    ]
    image_headers = {
        "Server-Timing": {"description": "decode, detect, upscale, faces, composite, encode, total (ms)",
                          "schema": {"type": "string"}},
        "X-Request-Id": {"schema": {"type": "string"}},
        "X-Face-Detection": {"description": "done, or skipped when faces are off or the preset has no face model "
                                            "(then the X-Faces-* counts are not sent)",
                             "schema": {"type": "string", "enum": ["done", "skipped"]}},
        "X-Faces-Detected": {"description": "Faces the detector found (absent when detection was skipped)",
                             "schema": {"type": "string"}},
        "X-Faces-Enhanced": {"description": "Faces enhanced and composited; the rest kept the background",
                             "schema": {"type": "string"}},
        "X-Faces-Over-Limit": {"description": "Faces beyond limits.max_faces (the smallest), kept as background",
                               "schema": {"type": "string"}},
        "X-Faces-Identity-Guarded": {"description": "With identity_guard: faces blended back toward the background "
                                                    "because the restored face was too far from the input's "
                                                    "(absent when the guard checked no face)",
                                     "schema": {"type": "string"}},
        "X-Faces-Identity": {"description": "With identity_guard: a JSON array, one object per face checked "
                                            "(face, guarded, distance_before, distance_after, strength, "
                                            "requested_strength); docs/faces.md",
                             "schema": {"type": "string"}},
    }
    security: list[dict[str, list[str]]] = [{"bearer": []}] if config.api_keys else []
    upload_body = {
        "required": True,
        "content": {
            **{media_type: {"schema": binary} for media_type in UPLOAD_TYPES},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {"image": binary},
                },
                "encoding": {"image": {"contentType": ", ".join(UPLOAD_TYPES)}},
            },
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "chaoqing",
            "version": __version__,
            "summary": "Photo super-resolution with face enhancement",
            "description": (
                "Upload a photo, get it back larger and sharper, faces enhanced. "
                f"Limits: {limits.max_body_bytes} bytes, {limits.max_input_pixels} input pixels, "
                f"{limits.max_output_pixels} output pixels."
            ),
        },
        "servers": [{"url": "/"}],
        "paths": {
            "/v1/enhance": {
                "post": {
                    "operationId": "enhance",
                    "summary": "Enhance one photo",
                    "security": security,
                    "parameters": enhance_parameters,
                    "requestBody": upload_body,
                    "responses": {
                        "200": {
                            "description": "The enhanced photo",
                            "headers": image_headers,
                            "content": {media_type: {"schema": binary} for media_type in IMAGE_TYPES},
                        },
                        "400": _error_response("invalid_image or invalid_parameter"),
                        "401": _error_response("unauthorized: API key missing or wrong"),
                        "408": _error_response("request_timeout: the upload did not arrive in time"),
                        "413": _error_response(
                            "image_too_large: bytes, input or output pixels over the limits; or "
                            "estimate_exceeds_deadline: the photo's compute, estimated from the upscaler's measured "
                            "speed before any model call, is longer than the request's deadline (the error gives "
                            "estimate_s and deadline_s): send it to POST /v1/jobs"),
                        "415": _error_response("unsupported_media_type"),
                        "500": _error_response("internal_error"),
                        "502": _error_response("model_error: a model server failed or answered badly"),
                        "503": _error_response("model_unavailable or overloaded", retry_after=True),
                        "504": _error_response("deadline_exceeded"),
                    },
                }
            },
            **_job_paths(config, enhance_parameters, upload_body, image_headers, security),
            "/healthz": {
                "get": {
                    "operationId": "health",
                    "summary": "The process serves",
                    "responses": {"200": {"description": "Alive", "content": {"application/json": {"schema": {
                        "type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}}}}},
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "ready",
                    "summary": "Every model the presets need has a ready endpoint",
                    "responses": {
                        "200": {"description": "Ready", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Readiness"}}}},
                        "503": {"description": "Not ready; lists the models that are not",
                                "headers": {"Retry-After": {"schema": {"type": "string"}}},
                                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Readiness"}}}},
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}},
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics",
                    "responses": {"200": {"description": "Text exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}}},
                }
            },
        },
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {
                                "code": {"type": "string", "enum": list(ERROR_CODES)},
                                "message": {"type": "string"},
                                "estimate_s": {"type": "number", "description":
                                               "estimate_exceeds_deadline: the estimated compute, in seconds"},
                                "deadline_s": {"type": "number", "description":
                                               "estimate_exceeds_deadline: the synchronous request's deadline"},
                                "jobs": {"type": "string", "description":
                                         "estimate_exceeds_deadline: where to send the photo instead"},
                            },
                        }
                    },
                },
                "Readiness": {
                    "type": "object",
                    "required": ["status", "models"],
                    "properties": {
                        "status": {"type": "string", "enum": ["ready", "not_ready"]},
                        "not_ready": {"type": "array", "items": {"type": "string"}},
                        "models": {"type": "object", "additionalProperties": {"type": "boolean"}},
                    },
                },
                **_job_schemas(),
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
