"""The same work one call after another: the baseline the gateway's concurrency is judged by.

The GFPGAN / Real-ESRGAN / CodeFormer command-line tools upscale, then detect, then restore
face after face. :func:`enhance_photo_sequentially` does exactly that with the pipeline's own
building blocks (the same decode, remote calls, alignment, paste and encode), so a benchmark
compares orchestration and nothing else. It lives here, apart from the request path: the
gateway has no sequential mode.
"""

from __future__ import annotations

from chaoqing.gateway.pipeline import (
    EnhanceOptions,
    EnhanceResult,
    FacesOutcome,
    PipelineServices,
    detect_faces,
    enhance_face,
    finish_photo,
    prepare_photo,
    upscale_background,
)

__all__ = ["enhance_photo_sequentially"]


def enhance_photo_sequentially(
    data: bytes, media_type: str | None, options: EnhanceOptions, services: PipelineServices
) -> EnhanceResult:
    """Upscale, detect, then each face in turn; raises what :func:`enhance_photo` raises."""
    request = prepare_photo(data, media_type, options, services)
    preset = request.config.presets[options.preset]
    background = upscale_background(request, preset.upscaler)
    faces = FacesOutcome(detection_skipped=True)
    if options.faces and preset.face_model:
        detected = detect_faces(request)
        face_model = request.remotes[preset.face_model]
        with request.timer("faces"):
            results = tuple(
                enhance_face(request, face_model, face, detected.template, request.deadline) for face in detected.chosen
            )
        faces = FacesOutcome(results)
    return finish_photo(request, background, faces)
