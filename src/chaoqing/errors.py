"""chaoqing's one exception hierarchy, and the one table that maps it to HTTP.

::

    ChaoqingError
     ├── InvalidRequest                 400 invalid_parameter
     │    ├── InvalidParameter          400 invalid_parameter
     │    ├── InvalidImage              400 invalid_image
     │    ├── UnsupportedMediaType      415 unsupported_media_type
     │    ├── ImageTooLarge             413 image_too_large
     │    ├── EstimateExceedsDeadline   413 estimate_exceeds_deadline (a synchronous photo that cannot
     │    │                                                        finish by its deadline: use /v1/jobs)
     │    ├── InvalidTensorRequest      400 invalid_tensor        (model server: bad v2 request)
     │    ├── BodyTooLarge              413 body_too_large        (model server)
     │    ├── SlowRequestBody           408 request_timeout       (the body did not arrive in time)
     │    ├── UnknownModel              404 unknown_model         (model server)
     │    ├── JobNotFound               404 job_not_found         (no such job, or not the caller's)
     │    ├── JobNotFinished            409 job_not_finished      (Retry-After; its result is not there yet)
     │    └── JobHasNoResult            409 job_has_no_result     (the job failed or was cancelled)
     ├── MalformedMessage               400 invalid_tensor        (a v2 message off the protocol;
     │                                                             the gateway's client says BadModelResponse)
     ├── Unauthorized                   401 unauthorized
     ├── Overloaded                     503 overloaded            (Retry-After)
     │    └── SpoolFull                 503 spool_full            (Retry-After; the job spool is at a bound)
     ├── ShuttingDown                   503 shutting_down         (Retry-After; the process is stopping)
     ├── DeadlineExceeded               504 deadline_exceeded
     ├── InferenceFailed                500 inference_failed      (model server: the runner raised)
     ├── RunnerError                    500 inference_failed      (a runner cannot be built or cannot compute)
     ├── JobLost                        500 job_lost              (a job's gateways stopped while running it, max_attempts times)
     ├── DegenerateLandmarks            502 model_error           (a detector's landmarks admit no alignment)
     ├── ModelServerError               502 model_error           (gateway: a remote call failed)
     │    ├── ModelUnavailable          503 model_unavailable     (Retry-After; refused, unreachable, circuit open)
     │    ├── ModelTimeout              504 deadline_exceeded
     │    └── BadModelResponse          502 model_error           (malformed or wrong-shaped tensors)
     ├── GatewayError                   502 gateway_error         (the CLI: a remote gateway answered an error)
     ├── ConfigError                    500 config_error          (start-up: a setting is wrong)
     ├── SupervisorError                503 model_unavailable     (start-up: an embedded model server did not start)
     ├── ModelsNotReady                 503 model_unavailable     (start-up: model servers not ready in time)
     └── BenchError                     500 bench_error           (a benchmark could not run)

Library code raises these; foreign exceptions are translated at the boundary with
``raise ... from exc``. Only the CLI exits; only the HTTP layers turn errors into responses,
through :func:`http_error_for`. Anything not in the table is a 500 ``internal_error`` with a
generic message, and its traceback goes to the log.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "HTTP_ERRORS",
    "BadModelResponse",
    "BenchError",
    "BodyTooLarge",
    "ChaoqingError",
    "ConfigError",
    "DeadlineExceeded",
    "DegenerateLandmarks",
    "EstimateExceedsDeadline",
    "GatewayError",
    "HttpError",
    "ImageTooLarge",
    "InferenceFailed",
    "InvalidImage",
    "InvalidParameter",
    "InvalidRequest",
    "InvalidTensorRequest",
    "JobHasNoResult",
    "JobLost",
    "JobNotFinished",
    "JobNotFound",
    "MalformedMessage",
    "ModelServerError",
    "ModelTimeout",
    "ModelUnavailable",
    "ModelsNotReady",
    "Overloaded",
    "RunnerError",
    "ShuttingDown",
    "SlowRequestBody",
    "SpoolFull",
    "SupervisorError",
    "Unauthorized",
    "UnknownModel",
    "UnsupportedMediaType",
    "http_error_for",
    "retry_after_for",
]


class ChaoqingError(Exception):
    """Base of every error chaoqing raises on purpose."""


class InvalidRequest(ChaoqingError):
    """The client sent something we will not process (a 4xx)."""


class InvalidParameter(InvalidRequest):
    """A query or form parameter is missing, malformed or out of range."""


class InvalidImage(InvalidRequest):
    """The body is not a decodable image."""


class UnsupportedMediaType(InvalidRequest):
    """The Content-Type is not one we accept."""


class ImageTooLarge(InvalidRequest):
    """Bytes, input pixels or output pixels exceed the configured limits."""


class EstimateExceedsDeadline(InvalidRequest):
    """A synchronous request whose estimated compute (``estimate_s``) is longer than its
    deadline (``deadline_s``): refused before any model call; POST /v1/jobs takes it.

    413, as for ImageTooLarge: the content is larger than the server is able to process in a
    synchronous request (RFC 9110 §15.5.14); the same photo is accepted as a job."""

    def __init__(self, message: str, *, estimate_s: float, deadline_s: float) -> None:
        super().__init__(message)
        self.estimate_s = estimate_s
        self.deadline_s = deadline_s


class InvalidTensorRequest(InvalidRequest):
    """A KServe v2 inference request is malformed (model server side)."""


class BodyTooLarge(InvalidRequest):
    """A request body exceeds the server's byte limit (model server; the gateway says ImageTooLarge)."""


class SlowRequestBody(InvalidRequest):
    """The request body did not arrive within the read timeout."""


class UnknownModel(InvalidRequest):
    """The model server does not serve the named model."""


class JobNotFound(InvalidRequest):
    """No job has this id, or it belongs to another API key (404 either way: ids do not leak)."""


class JobNotFinished(InvalidRequest):
    """The job is queued or running: its result is not there yet; retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class JobHasNoResult(InvalidRequest):
    """The job failed or was cancelled, so it has no result (its state says why)."""


class Unauthorized(ChaoqingError):
    """A missing or wrong API key."""


class Overloaded(ChaoqingError):
    """Too much work in flight; the caller should retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SpoolFull(Overloaded):
    """The job spool holds ``[jobs] max_jobs`` jobs or ``max_bytes`` bytes; retry after ``retry_after_s``
    (when the next finished job expires)."""


class MalformedMessage(ChaoqingError, ValueError):
    """A v2 message that does not follow the protocol; the text says what is wrong."""


class ShuttingDown(ChaoqingError):
    """The process is stopping and its grace period is over; retry on another (or later)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ChaoqingError):
    """The request's deadline passed before its work finished."""


class InferenceFailed(ChaoqingError):
    """A runner raised while computing (model server side)."""


class ModelServerError(ChaoqingError):
    """A remote model call failed; ``status`` is the server's HTTP status when it answered."""

    def __init__(self, message: str, *, model: str = "", endpoint: str = "", status: int = 0) -> None:
        super().__init__(message)
        self.model = model
        self.endpoint = endpoint
        self.status = status


class ModelUnavailable(ModelServerError):
    """The model server refused, is unreachable, is not ready, or its circuit is open."""

    retry_after_s = 1.0


class ModelTimeout(ModelServerError):
    """A remote call did not finish within its deadline."""


class BadModelResponse(ModelServerError):
    """The model server answered with something that is not the tensors we asked for."""


class RunnerError(ChaoqingError):
    """A runner cannot be built (missing weights, unusable device) or cannot compute."""


class JobLost(ChaoqingError):
    """A job's gateway stopped without releasing it (killed, crashed, out of memory) as often as
    ``[jobs] max_attempts`` allows; the job is failed with this reason rather than run again."""


class DegenerateLandmarks(ChaoqingError, ValueError):
    """The landmarks admit no alignment (coincident or non-finite points)."""


class GatewayError(ChaoqingError):
    """A remote gateway answered with an error (the CLI's ``--server`` mode); ``status`` is its HTTP status."""

    def __init__(self, message: str, *, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class ConfigError(ChaoqingError):
    """A configuration value is missing, malformed or out of range."""


class SupervisorError(ChaoqingError):
    """An embedded model-server child could not be started."""


class ModelsNotReady(ChaoqingError):
    """Model servers did not become ready in time."""


class BenchError(ChaoqingError):
    """A benchmark could not run: a child did not start, a server answered wrongly."""


@dataclass(frozen=True)
class HttpError:
    """How one kind of error looks on the wire."""

    status: int
    code: str


# The one table. Lookup walks the exception's MRO, so the most specific entry wins.
HTTP_ERRORS: dict[type[BaseException], HttpError] = {
    InvalidParameter: HttpError(400, "invalid_parameter"),
    InvalidImage: HttpError(400, "invalid_image"),
    UnsupportedMediaType: HttpError(415, "unsupported_media_type"),
    ImageTooLarge: HttpError(413, "image_too_large"),
    EstimateExceedsDeadline: HttpError(413, "estimate_exceeds_deadline"),
    InvalidTensorRequest: HttpError(400, "invalid_tensor"),
    BodyTooLarge: HttpError(413, "body_too_large"),
    SlowRequestBody: HttpError(408, "request_timeout"),
    UnknownModel: HttpError(404, "unknown_model"),
    JobNotFound: HttpError(404, "job_not_found"),
    JobNotFinished: HttpError(409, "job_not_finished"),
    JobHasNoResult: HttpError(409, "job_has_no_result"),
    InvalidRequest: HttpError(400, "invalid_parameter"),
    MalformedMessage: HttpError(400, "invalid_tensor"),
    Unauthorized: HttpError(401, "unauthorized"),
    Overloaded: HttpError(503, "overloaded"),
    SpoolFull: HttpError(503, "spool_full"),
    ShuttingDown: HttpError(503, "shutting_down"),
    DeadlineExceeded: HttpError(504, "deadline_exceeded"),
    InferenceFailed: HttpError(500, "inference_failed"),
    ModelUnavailable: HttpError(503, "model_unavailable"),
    ModelTimeout: HttpError(504, "deadline_exceeded"),
    BadModelResponse: HttpError(502, "model_error"),
    ModelServerError: HttpError(502, "model_error"),
    RunnerError: HttpError(500, "inference_failed"),
    JobLost: HttpError(500, "job_lost"),
    DegenerateLandmarks: HttpError(502, "model_error"),
    GatewayError: HttpError(502, "gateway_error"),
    ConfigError: HttpError(500, "config_error"),
    SupervisorError: HttpError(503, "model_unavailable"),
    ModelsNotReady: HttpError(503, "model_unavailable"),
    BenchError: HttpError(500, "bench_error"),
}

INTERNAL_ERROR = HttpError(500, "internal_error")


def http_error_for(error: BaseException) -> HttpError:
    """Return the status and code for ``error``; 500 internal_error for anything unplanned."""
    for klass in type(error).__mro__:
        found = HTTP_ERRORS.get(klass)
        if found is not None:
            return found
    return INTERNAL_ERROR


def retry_after_for(error: BaseException) -> float | None:
    """Seconds for a Retry-After header, or None when the error does not invite a retry."""
    if isinstance(error, (Overloaded, ShuttingDown, JobNotFinished)):
        return error.retry_after_s
    if isinstance(error, ModelUnavailable):
        return error.retry_after_s
    return None
