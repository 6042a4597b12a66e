"""The gateway's HTTP API: a Falcon WSGI app in front of :mod:`chaoqing.gateway.pipeline`.

Routes::

    POST /v1/enhance       image in (raw image/* body, or multipart field "image"), image out; refused
                           at once (413 estimate_exceeds_deadline) when its estimated compute passes
                           the deadline (chaoqing.gateway.estimate)
    POST /v1/jobs          the same in, 202 + Location: /v1/jobs/{id} (the photo is done in the background)
    GET  /v1/jobs/{id}     the job: status, progress (stage, tiles, faces, elapsed, ETA), result or error
    GET  /v1/jobs/{id}/result   the image of a done job
    GET  /v1/jobs/{id}/events   the job as Server-Sent Events, until it ends
    DELETE /v1/jobs/{id}   cancel a queued or running job; delete a finished one
    GET  /healthz          the process serves
    GET  /readyz           every model the presets need has a ready endpoint (else 503 + which)
    GET  /openapi.json     OpenAPI 3.1 of this API
    GET  /metrics          Prometheus metrics
    GET  /                 a small web page to try it

Errors are ``{"error": {"code": ..., "message": ...}}`` with the status from the one table in
:mod:`chaoqing.errors`. Client faults are logged as one line; server faults as a traceback,
through :meth:`Gateway.handle_unexpected`, and never shown to the client.

Run it with :func:`chaoqing.gateway.server.serve_gateway` (gevent's WSGIServer) or under gunicorn
(``gunicorn -k gevent 'chaoqing.wsgi:app'``); either way the process is monkey-patched.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

import falcon
import gevent
from greenlet import greenlet

from chaoqing.config import Config
from chaoqing.errors import (
    ChaoqingError,
    EstimateExceedsDeadline,
    ImageTooLarge,
    InvalidParameter,
    JobNotFound,
    Overloaded,
    ShuttingDown,
    SlowRequestBody,
    Unauthorized,
    UnsupportedMediaType,
    http_error_for,
    retry_after_for,
)
from chaoqing.gateway.estimate import ComputeEstimate, ComputeEstimator
from chaoqing.gateway.jobs import JobService, job_document, key_digest
from chaoqing.gateway.metrics import GatewayMetrics
from chaoqing.gateway.openapi import openapi_document
from chaoqing.gateway.pipeline import EnhanceOptions, EnhanceResult, PipelineServices, enhance_photo
from chaoqing.gateway.remote import RemoteModels
from chaoqing.gateway.stages.decode import check_media_type, probe_image
from chaoqing.protocol.listen import BODY_READ_KEY

__all__ = ["Gateway", "create_app", "parse_enhance_options"]

_log = logging.getLogger("chaoqing.gateway.app")
_access_log = logging.getLogger("chaoqing.access")

REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
BODY_READ_TIMEOUT_S = 60.0  # the default of Config.body_read_timeout_s
READ_CHUNK_BYTES = 1024 * 1024
OUTPUT_FORMATS = ("png", "jpeg", "webp")
MAX_QUALITY_DIGITS = 8  # longer numbers are out of range anyway (and int() refuses > 4300 digits)
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
UNMATCHED_ROUTE = "(unmatched)"  # the route label of requests no route took (bounded label values)
SHUTTING_DOWN_RETRY_AFTER_S = 1.0  # another gateway process (or this one's successor) takes the retry


def _parse_scale(raw: str | None, default: float) -> float:
    if raw is None or raw == "":
        return default
    try:
        scale = float(raw)
    except ValueError:
        raise InvalidParameter(f"scale must be a number between 1 and 4, not {raw!r}") from None
    if not math.isfinite(scale) or not 1.0 <= scale <= 4.0:
        raise InvalidParameter(f"scale must be between 1 and 4, not {raw!r}")
    return scale


def _parse_bool(raw: str | None, name: str, default: bool) -> bool:
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in TRUE_WORDS:
        return True
    if lowered in FALSE_WORDS:
        return False
    raise InvalidParameter(f"{name} must be true or false, not {raw!r}")


def _parse_optional_bool(raw: str | None, name: str) -> bool | None:
    """A boolean query parameter whose absence means "the preset's"."""
    return None if raw is None or raw == "" else _parse_bool(raw, name, False)


def _parse_quality(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    digits = raw.strip().lstrip("+")
    # ASCII digits only: str.isdigit() also takes '²', which int() refuses (a 500, found by fuzzing)
    if not (digits.isascii() and digits.isdigit()) or len(digits) > MAX_QUALITY_DIGITS:
        raise InvalidParameter(f"quality must be an integer between 1 and 100, not {raw[:40]!r}")
    quality = int(digits)
    if not 1 <= quality <= 100:
        raise InvalidParameter(f"quality must be between 1 and 100, not {raw!r}")
    return quality


def parse_enhance_options(request: falcon.Request, config: Config, request_id: str) -> EnhanceOptions:
    """The photo's parameters from the query string, as /v1/enhance and /v1/jobs take them.

    Raises InvalidParameter."""
    preset = request.get_param("preset") or config.preset
    if preset not in config.presets:
        raise InvalidParameter(f"preset must be one of {', '.join(config.presets)}, not {preset!r}")
    return EnhanceOptions(
        scale=_parse_scale(request.get_param("scale"), config.scale),
        faces=_parse_bool(request.get_param("faces"), "faces", True),
        preset=preset,
        output_format=_parse_choice(request.get_param("format"), "format", OUTPUT_FORMATS),
        quality=_parse_quality(request.get_param("quality")),
        request_id=request_id,
        strip_metadata=_parse_bool(request.get_param("strip_metadata"), "strip_metadata", config.encode.strip_metadata),
        strip_gps=_parse_bool(request.get_param("strip_gps"), "strip_gps", config.encode.strip_gps),
        face_strength=_parse_face_strength(request.get_param("face_strength")),
        face_fidelity=_parse_unit_number(request.get_param("face_fidelity"), "face_fidelity"),
        face_colour=_parse_optional_bool(request.get_param("face_colour"), "face_colour"),
        face_texture=_parse_optional_bool(request.get_param("face_texture"), "face_texture"),
        identity_guard=_parse_optional_bool(request.get_param("identity_guard"), "identity_guard"),
    )


def _parse_face_strength(raw: str | None) -> float | None:
    """``face_strength``: a number in [0, 1], or None (the preset's). Raises InvalidParameter."""
    if raw is None or raw == "":
        return None
    try:
        strength = float(raw)
    except ValueError:
        raise InvalidParameter(f"face_strength must be a number between 0 and 1, not {raw!r}") from None
    if not (math.isfinite(strength) and 0.0 <= strength <= 1.0):
        raise InvalidParameter(f"face_strength must be between 0 and 1, not {raw!r}")
    return strength


def _parse_unit_number(raw: str | None, name: str) -> float | None:
    """``name``: a number in [0, 1], or None (the preset's). Raises InvalidParameter."""
    if raw is None or raw == "":
        return None
    try:
        number = float(raw)
    except ValueError:
        raise InvalidParameter(f"{name} must be a number between 0 and 1, not {raw!r}") from None
    if not (math.isfinite(number) and 0.0 <= number <= 1.0):
        raise InvalidParameter(f"{name} must be between 0 and 1, not {raw!r}")
    return number


def _parse_choice(raw: str | None, name: str, choices: tuple[str, ...]) -> str | None:
    if raw is None or raw == "":
        return None
    lowered = raw.strip().lower()
    if lowered == "jpg" and "jpeg" in choices:
        lowered = "jpeg"
    if lowered not in choices:
        raise InvalidParameter(f"{name} must be one of {', '.join(choices)}, not {raw!r}")
    return lowered


class Gateway:
    """The HTTP side of one gateway process: admission, parsing, errors, headers."""

    def __init__(self, config: Config, remotes: RemoteModels, metrics: GatewayMetrics | None = None) -> None:
        self.config = config
        self.remotes = remotes
        self.metrics = metrics or GatewayMetrics()
        self.services = PipelineServices(config=config, remotes=remotes, observer=self.metrics)
        self._requests: set[greenlet] = set()  # the greenlets of admitted /v1/enhance requests
        self.stopping = False
        self._api_keys = tuple(key.encode() for key in config.api_keys)
        self.estimator = ComputeEstimator(remotes, config.jobs.default_megapixels_per_s)
        self.jobs = JobService(config, self.services, self.metrics, self.estimator)
        self.app = _build_app(self)

    # -- plumbing ------------------------------------------------------------------------

    def check_api_key(self, request: falcon.Request) -> None:
        if not self._api_keys:
            return
        header = request.get_header("Authorization") or ""
        scheme, _, token = header.partition(" ")
        supplied = token.strip().encode() if scheme.lower() == "bearer" else b""
        # compare against every key so the time taken does not say which one nearly matched
        matched = False
        for key in self._api_keys:
            matched |= hmac.compare_digest(supplied, key)
        if not matched:
            raise Unauthorized("a valid API key is required: Authorization: Bearer <key>")

    def caller_key_sha256(self, request: falcon.Request) -> str:
        """What a job keeps of the caller's API key (checked by :meth:`check_api_key` first):
        its SHA-256; "" when no keys are configured."""
        if not self._api_keys:
            return ""
        scheme, _, token = (request.get_header("Authorization") or "").partition(" ")
        return key_digest(token.strip()) if scheme.lower() == "bearer" else ""

    def read_image_body(self, request: falcon.Request, limit: int | None = None) -> tuple[bytes, str | None]:
        """The uploaded image bytes and their declared media type, bounded while reading (by
        ``limit``, else ``limits.max_body_bytes``).

        A Content-Length over the limit is refused before a byte is read, a chunked body as
        soon as it passes the limit, a body that trickles in after ``body_read_timeout_s``.
        Only a body read to its end is marked read (BODY_READ_KEY): any error before that
        closes the connection instead of reading and discarding the rest."""
        limit = self.config.limits.max_body_bytes if limit is None else limit
        if request.content_length is not None and request.content_length > limit:
            raise ImageTooLarge(f"the upload is {request.content_length} bytes; the limit is {limit}")
        content_type = (request.content_type or "").split(";")[0].strip().lower()
        # Transfer-Encoding: chunked has no Content-Length, and Falcon's bounded_stream reads
        # nothing then; the server's decoded wsgi.input is read instead, bounded all the same
        stream = request.bounded_stream if request.content_length is not None else request.stream
        upload: tuple[bytes, str | None] | None = None
        try:
            with gevent.Timeout(self.config.body_read_timeout_s, SlowRequestBody("the request body did not arrive in time")):
                if content_type == "multipart/form-data":
                    upload = self._read_multipart(request, limit)
                elif content_type.startswith("image/") or content_type == "application/octet-stream":
                    upload = self._read_bounded(stream, limit), content_type
        except (OSError, falcon.MediaMalformedError, falcon.HTTPError) as exc:
            if isinstance(exc, falcon.HTTPError) and exc.status_code == 413:
                raise ImageTooLarge(f"the upload exceeds the limit of {limit} bytes") from None
            raise InvalidParameter(f"could not read the upload: {getattr(exc, 'description', None) or exc}") from None
        if upload is None:
            raise UnsupportedMediaType(
                f"send the image as the body with Content-Type image/* or as multipart/form-data field 'image', "
                f"not {content_type or 'no Content-Type'}"
            )
        request.env[BODY_READ_KEY] = True
        return upload

    @staticmethod
    def _read_bounded(stream: Any, limit: int) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = stream.read(READ_CHUNK_BYTES)
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                raise ImageTooLarge(f"the upload exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _read_multipart(self, request: falcon.Request, limit: int) -> tuple[bytes, str | None]:
        form = request.get_media()
        found: tuple[bytes, str | None] | None = None
        for part in form:
            if part.name == "image" and found is None:
                data = self._read_bounded(part.stream, limit)
                found = (data, (part.content_type or "").split(";")[0].strip().lower() or None)
            else:
                part.stream.pipe()  # drain fields we do not use
        if found is None:
            raise InvalidParameter("the multipart form has no field named 'image'")
        return found

    @property
    def in_flight(self) -> int:
        """Enhance requests admitted and not yet released."""
        return len(self._requests)

    def admit(self) -> None:
        """Count the calling greenlet's request in. Raises ShuttingDown once :meth:`begin_shutdown`
        was called, Overloaded when ``max_in_flight`` requests are in flight already."""
        self.refuse_when_stopping()
        if self.in_flight >= self.config.max_in_flight:
            raise Overloaded(
                f"{self.in_flight} requests in flight, the limit of this gateway process; retry shortly",
                retry_after_s=1.0,
            )
        self._requests.add(gevent.getcurrent())
        self.metrics.in_flight.set(self.in_flight)

    def release(self) -> None:
        """Count the calling greenlet's request out (after :meth:`admit`, in a finally)."""
        self._requests.discard(gevent.getcurrent())
        self.metrics.in_flight.set(self.in_flight)

    def refuse_when_stopping(self) -> None:
        """Raises ShuttingDown once :meth:`begin_shutdown` was called."""
        if self.stopping:
            raise ShuttingDown(
                "this gateway process is shutting down; retry on another", retry_after_s=SHUTTING_DOWN_RETRY_AFTER_S
            )

    def begin_shutdown(self) -> None:
        """From now on every request is answered 503 shutting_down (with Connection: close);
        those already admitted go on."""
        self.stopping = True

    def cancel_in_flight(self) -> int:
        """Answer every admitted request 503 shutting_down now; returns how many there were.

        Each request's greenlet gets ShuttingDown raised where it waits, unwinds through the
        pipeline (whose finally blocks kill its branches) and Falcon's error handler writes the
        JSON 503. The exception is delivered from the hub a moment later, and only to a request
        still admitted then: one that finished in between is not cut off while it writes."""
        error = ShuttingDown(
            "this gateway process stopped before the request finished; retry on another",
            retry_after_s=SHUTTING_DOWN_RETRY_AFTER_S,
        )
        loop = gevent.get_hub().loop
        requests = list(self._requests)
        for request_greenlet in requests:
            loop.run_callback(self._cancel_request, request_greenlet, error)
        return len(requests)

    def _cancel_request(self, request_greenlet: greenlet, error: ShuttingDown) -> None:
        if request_greenlet in self._requests and not request_greenlet.dead:
            request_greenlet.throw(error)  # runs on the hub, as gevent's own Greenlet.kill does

    def refuse_beyond_deadline(self, data: bytes, media_type: str | None, options: EnhanceOptions) -> ComputeEstimate:
        """The photo's compute estimate (header only, no pixel decoded, no model called);
        raises EstimateExceedsDeadline when it is longer than the request's deadline, and what
        the pipeline's decode would raise for the upload (UnsupportedMediaType, InvalidImage,
        ImageTooLarge), in the same order."""
        check_media_type(media_type, data)
        info = gevent.get_hub().threadpool.apply(probe_image, (data, self.config.limits))
        upscaler = self.config.presets[options.preset].upscaler
        estimate = self.estimator.estimate(upscaler, info.width, info.height, options.scale)
        deadline_s = self.config.request_deadline_s
        if estimate.seconds > deadline_s:
            raise EstimateExceedsDeadline(
                f"this photo ({info.width}×{info.height}, ×{options.scale:g}) is estimated to take "
                f"{estimate.seconds:.0f} s, longer than the {deadline_s:g} s a synchronous request may run "
                f"({upscaler} at {estimate.speed.megapixels_per_s:.3g} input MP/s, {estimate.speed.basis}); "
                "send it to POST /v1/jobs, which runs it in the background with progress and an ETA",
                estimate_s=round(estimate.seconds, 1), deadline_s=deadline_s,
            )
        return estimate

    # -- errors --------------------------------------------------------------------------

    def handle_error(self, request: falcon.Request, response: falcon.Response, error: Exception, params: Any) -> None:
        """Falcon error handler for everything: the table decides the status."""
        if _body_unread(request) or isinstance(error, ShuttingDown):
            # QuietHandler then closes the connection rather than read (and wait for) the rest
            # of a body nobody wants: a 2 GB upload refused with 413 costs nothing more; and a
            # stopping process takes no further request on a kept-alive connection
            response.set_header("Connection", "close")
        if isinstance(error, falcon.HTTPError) and not isinstance(error, ChaoqingError):
            code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "invalid_request")
            self._write_error(response, error.status_code, code, str(error.title or error.description))
            for name, value in dict(error.headers or {}).items():  # a 405's Allow (RFC 9110 §15.5.6)
                response.set_header(name, value)
            return
        if isinstance(error, ChaoqingError):
            mapped = http_error_for(error)
            # /v1/enhance writes its own access line with the code and message; one line per request
            log_level = logging.DEBUG if request.path == "/v1/enhance" else logging.INFO
            _log.log(log_level, "%s %s -> %d %s: %s", request.method, request.path, mapped.status, mapped.code, error)
            self._write_error(response, mapped.status, mapped.code, str(error), _error_details(error))
            retry_after = retry_after_for(error)
            if retry_after is not None:
                response.set_header("Retry-After", str(max(1, math.ceil(retry_after))))
            return
        self.handle_unexpected(request, error)
        self._write_error(response, 500, "internal_error", "internal server error")

    def handle_unexpected(self, request: falcon.Request, error: BaseException) -> None:
        """One overridable hook for server faults: a traceback in the log, never in the response."""
        _log.error("unexpected error on %s %s", request.method, request.path, exc_info=error)

    @staticmethod
    def _write_error(response: falcon.Response, status: int, code: str, message: str,
                     details: Mapping[str, Any] | None = None) -> None:
        response.status = status
        response.content_type = falcon.MEDIA_JSON
        response.text = json.dumps({"error": {"code": code, "message": message, **(details or {})}})


def _error_details(error: ChaoqingError) -> dict[str, Any]:
    """The fields an error adds to its JSON beside code and message."""
    if isinstance(error, EstimateExceedsDeadline):
        return {"estimate_s": error.estimate_s, "deadline_s": error.deadline_s, "jobs": "/v1/jobs"}
    return {}


def _body_unread(request: falcon.Request) -> bool:
    """Whether the request has a body the app did not read to its end."""
    try:
        declared = request.content_length or 0
    except falcon.HTTPError:  # a Content-Length that is no number: where the body ends is unknown
        return True
    has_body = declared > 0 or "chunked" in (request.get_header("Transfer-Encoding") or "").lower()
    return has_body and not request.env.get(BODY_READ_KEY)


def _request_id(request: falcon.Request) -> str:
    supplied = request.get_header("X-Request-Id")
    if supplied and REQUEST_ID_PATTERN.match(supplied):
        return supplied
    return uuid.uuid4().hex


def _server_timing(timings: Mapping[str, float]) -> str:
    return ", ".join(f"{stage};dur={seconds * 1000:.1f}" for stage, seconds in timings.items())


class EnhanceResource:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def on_post(self, request: falcon.Request, response: falcon.Response) -> None:
        gateway = self.gateway
        started = time.monotonic()
        request_id = _request_id(request)
        response.set_header("X-Request-Id", request_id)
        preset = request.get_param("preset") or gateway.config.preset
        status = 500
        result: EnhanceResult | None = None
        bytes_in = 0
        error_code = error_message = ""
        try:
            gateway.check_api_key(request)
            options = parse_enhance_options(request, gateway.config, request_id)
            gateway.admit()
            try:
                data, media_type = gateway.read_image_body(request)
                bytes_in = len(data)
                estimate = gateway.refuse_beyond_deadline(data, media_type, options)  # before any model call
                result = enhance_photo(data, media_type, options, gateway.services)
                gateway.estimator.observe(estimate.model, estimate.input_megapixels, result.timings.get("upscale"))
            finally:
                gateway.release()
            status = 200
        except Exception as exc:
            status = http_error_for(exc).status
            error_code = http_error_for(exc).code
            error_message = str(exc) if isinstance(exc, ChaoqingError) else type(exc).__name__
            raise
        finally:
            total = time.monotonic() - started
            gateway.metrics.observe_request("/v1/enhance", status, preset if preset in gateway.config.presets else "invalid", total, result)
            fields: dict[str, Any] = {
                "request_id": request_id, "route": "/v1/enhance", "status": status, "preset": preset,
                "bytes_in": bytes_in, "total_ms": round(total * 1000, 1),
            }
            if result is not None:
                fields.update(
                    bytes_out=len(result.data),
                    faces_detected=None if result.face_detection_skipped else result.faces_detected,
                    faces_enhanced=result.faces_enhanced, faces_over_limit=result.faces_over_limit,
                    faces_identity_guarded=sum(1 for check in result.faces.identity_checks if check["guarded"]),
                    stages_ms={stage: round(seconds * 1000, 1) for stage, seconds in result.timings.items()},
                )
            if error_code:
                fields["error"] = error_code
                fields["error_message"] = error_message
            _access_log.info("POST /v1/enhance %d", status, extra={"fields": fields})
        response.content_type = result.media_type
        response.data = result.data
        _set_photo_headers(response, result.timings, result.face_detection_skipped,
                           (result.faces_detected, result.faces_enhanced, result.faces_over_limit),
                           (result.width, result.height), result.faces.identity_checks)


def _set_photo_headers(
    response: falcon.Response, timings: Mapping[str, float], face_detection_skipped: bool,
    faces: tuple[int, int, int], size: tuple[int, int], identity: Sequence[Mapping[str, Any]] = (),
) -> None:
    """The headers of an enhanced photo (from /v1/enhance, or a job's result). ``faces``:
    detected, enhanced, over the limit; ``identity``: the identity guard's per-face report."""
    response.set_header("Server-Timing", _server_timing(timings))
    # faces off, or a preset without a face model: say so, rather than claim 0 faces were found
    response.set_header("X-Face-Detection", "skipped" if face_detection_skipped else "done")
    if not face_detection_skipped:
        response.set_header("X-Faces-Detected", str(faces[0]))
        response.set_header("X-Faces-Enhanced", str(faces[1]))
        response.set_header("X-Faces-Over-Limit", str(faces[2]))
    if identity:
        response.set_header("X-Faces-Identity-Guarded", str(sum(1 for check in identity if check["guarded"])))
        response.set_header("X-Faces-Identity", json.dumps(list(identity), separators=(",", ":")))
    response.set_header("X-Output-Size", f"{size[0]}x{size[1]}")
    response.set_header(
        "Access-Control-Expose-Headers",
        "Server-Timing, X-Face-Detection, X-Faces-Detected, X-Faces-Enhanced, X-Faces-Over-Limit, X-Request-Id, "
        "X-Output-Size, X-Faces-Identity-Guarded, X-Faces-Identity, Location",
    )
    response.set_header("Timing-Allow-Origin", "*")


class JobsResource:
    """POST /v1/jobs: the upload checked (parameters, limits, room in the spool) and stored."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def on_post(self, request: falcon.Request, response: falcon.Response) -> None:
        gateway = self.gateway
        request_id = _request_id(request)
        response.set_header("X-Request-Id", request_id)
        gateway.check_api_key(request)
        options = parse_enhance_options(request, gateway.config, request_id)
        if request.content_length is not None:  # refused before a byte is read
            gateway.jobs.check_room(request.content_length)
        data, media_type = gateway.read_image_body(request, gateway.config.jobs.max_body_bytes)
        state = gateway.jobs.submit(data, media_type, options, gateway.caller_key_sha256(request))
        response.status = 202
        response.location = f"/v1/jobs/{state.id}"
        response.set_header("Access-Control-Expose-Headers", "Location, X-Request-Id")
        response.media = job_document(state)


class JobResource:
    """GET /v1/jobs/{id}: the job; DELETE: cancel it (or delete it once finished)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def on_get(self, request: falcon.Request, response: falcon.Response, job_id: str) -> None:
        self.gateway.check_api_key(request)
        state = self.gateway.jobs.find(job_id, self.gateway.caller_key_sha256(request))
        response.media = job_document(state)
        response.cache_control = ["no-store"]

    def on_delete(self, request: falcon.Request, response: falcon.Response, job_id: str) -> None:
        self.gateway.check_api_key(request)
        status, state = self.gateway.jobs.cancel(job_id, self.gateway.caller_key_sha256(request))
        response.status = status
        if state is not None:
            response.media = job_document(state)


class JobResultResource:
    """GET /v1/jobs/{id}/result: the image, streamed from the spool, with /v1/enhance's headers."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def on_get(self, request: falcon.Request, response: falcon.Response, job_id: str) -> None:
        self.gateway.check_api_key(request)
        state, chunks, size = self.gateway.jobs.open_result(job_id, self.gateway.caller_key_sha256(request))
        result = state.result
        if result is None:  # a done state always has one; a hand-edited spool might not
            raise JobNotFound(f"no result for job {job_id}")
        response.content_type = result.media_type
        response.stream = chunks
        response.content_length = size
        response.set_header("X-Request-Id", state.request_id or state.id)
        _set_photo_headers(response, {stage: ms / 1000 for stage, ms in result.timings_ms.items()},
                           result.faces_detected is None,
                           (result.faces_detected or 0, result.faces_enhanced, result.faces_over_limit),
                           (result.width, result.height), result.faces_identity)


class JobEventsResource:
    """GET /v1/jobs/{id}/events: Server-Sent Events until the job ends."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def on_get(self, request: falcon.Request, response: falcon.Response, job_id: str) -> None:
        self.gateway.check_api_key(request)
        response.stream = self.gateway.jobs.events(job_id, self.gateway.caller_key_sha256(request))
        response.content_type = "text/event-stream"
        response.cache_control = ["no-cache"]
        response.set_header("X-Accel-Buffering", "no")  # nginx: pass each event on at once


class HealthResource:
    def on_get(self, request: falcon.Request, response: falcon.Response) -> None:
        response.media = {"status": "ok"}


class ReadyResource:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def on_get(self, request: falcon.Request, response: falcon.Response) -> None:
        needed = self.gateway.config.models_needed()
        configured = set(self.gateway.remotes.names())
        readiness = self.gateway.remotes.readiness()
        models = {name: bool(readiness.get(name)) if name in configured else False for name in needed}
        not_ready = sorted(name for name, ready in models.items() if not ready)
        if not_ready:
            response.status = 503
            response.media = {"status": "not_ready", "not_ready": not_ready, "models": models}
            response.set_header("Retry-After", "1")
        else:
            response.media = {"status": "ready", "models": models}


class OpenApiResource:
    def __init__(self, gateway: Gateway) -> None:
        self.document = json.dumps(openapi_document(gateway.config))

    def on_get(self, request: falcon.Request, response: falcon.Response) -> None:
        response.content_type = falcon.MEDIA_JSON
        response.text = self.document


class MetricsResource:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def on_get(self, request: falcon.Request, response: falcon.Response) -> None:
        self.gateway.metrics.refresh_circuits(self.gateway.remotes)
        body, content_type = self.gateway.metrics.exposition()
        response.content_type = content_type
        response.data = body


class WebPageResource:
    def on_get(self, request: falcon.Request, response: falcon.Response, name: str = "index.html") -> None:
        if name not in ("index.html", "app.js", "style.css"):
            raise falcon.HTTPNotFound()
        package = resources.files("chaoqing.gateway") / "web" / name
        try:
            data = package.read_bytes()
        except FileNotFoundError:
            raise falcon.HTTPNotFound() from None
        response.content_type = {"html": falcon.MEDIA_HTML, "js": falcon.MEDIA_JS, "css": "text/css"}[name.rsplit(".", 1)[1]]
        response.data = data
        response.cache_control = ["no-cache"]


class RefuseWhenStoppingMiddleware:
    """Once the gateway is stopping, answers 503 shutting_down to every request but /v1/enhance
    (which is refused by :meth:`Gateway.admit`, so that its access line says so)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def process_resource(self, request: falcon.Request, response: falcon.Response, resource: Any, params: Any) -> None:
        if not isinstance(resource, EnhanceResource):
            self.gateway.refuse_when_stopping()


class RequestMetricsMiddleware:
    """Counts and times the requests to every route but /v1/enhance, which records its own
    (with its preset, stages and faces); logs them at debug level (health checks are many)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def process_request(self, request: falcon.Request, response: falcon.Response) -> None:
        request.context.started = time.monotonic()

    def process_response(
        self, request: falcon.Request, response: falcon.Response, resource: Any, request_succeeded: bool
    ) -> None:
        if isinstance(resource, EnhanceResource):
            return
        started = request.context.get("started")
        seconds = time.monotonic() - started if started is not None else 0.0
        route = request.uri_template or UNMATCHED_ROUTE
        status = response.status_code
        self.gateway.metrics.observe_request(route, status, "", seconds, None)
        if _access_log.isEnabledFor(logging.DEBUG):
            fields = {"route": route, "status": status, "total_ms": round(seconds * 1000, 1)}
            _access_log.debug("%s %s %d", request.method, request.path, status, extra={"fields": fields})


def create_app(
    config: Config, remotes: RemoteModels, metrics: GatewayMetrics | None = None
) -> falcon.App[falcon.Request, falcon.Response]:
    """The WSGI app for ``config``, calling models through ``remotes``."""
    return Gateway(config, remotes, metrics).app


def _build_app(gateway: Gateway) -> falcon.App[falcon.Request, falcon.Response]:
    app = falcon.App(cors_enable=False, middleware=[RequestMetricsMiddleware(gateway)])
    app.add_middleware(RefuseWhenStoppingMiddleware(gateway))
    app.req_options.strip_url_path_trailing_slash = True
    app.req_options.auto_parse_qs_csv = False
    app.resp_options.secure_cookies_by_default = True
    app.add_route("/v1/enhance", EnhanceResource(gateway))
    app.add_route("/v1/jobs", JobsResource(gateway))
    app.add_route("/v1/jobs/{job_id}", JobResource(gateway))
    app.add_route("/v1/jobs/{job_id}/result", JobResultResource(gateway))
    app.add_route("/v1/jobs/{job_id}/events", JobEventsResource(gateway))
    app.add_route("/healthz", HealthResource())
    app.add_route("/readyz", ReadyResource(gateway))
    app.add_route("/openapi.json", OpenApiResource(gateway))
    app.add_route("/metrics", MetricsResource(gateway))
    page = WebPageResource()
    app.add_route("/", page)
    app.add_route("/web/{name}", page)
    app.add_error_handler(Exception, gateway.handle_error)
    app.add_error_handler(falcon.HTTPError, gateway.handle_error)
    return app
