"""How long a photo's compute will take: the one estimator, used by the synchronous request
(refused at once when it cannot finish by its deadline) and by jobs (their ETA before the
first tile is measured).

The estimate is the background's input megapixels over the upscaler's speed, plus the
finish (composite and encode) at ``FINISH_SECONDS_PER_OUTPUT_MEGAPIXEL``. Faces run beside
the background and how many there are is known only after detection, so they are not in it:
it is a lower bound for a photo with faces.

The upscaler's speed, in input megapixels per second, from the best source there is::

    observed   what this gateway measured: the photos it upscaled lately (their input
               megapixels over the upscale stage's wall time, queueing and contention
               included), recent and large photos weighing most
    metadata   the model's metadata ``parameters.input_megapixels_per_s``
    default    ``[jobs] default_megapixels_per_s`` (the compact ×4 model on a 2-core CPU)

The observed speed is a ratio of decayed sums, Σ megapixels / Σ seconds, each sum multiplied
by ``OBSERVED_DECAY`` before a new photo is added: a photo's weight is its size (a thumbnail,
whose fixed costs of a few calls dominate, barely moves it), and older photos fade, so the
speed follows the machine's load. Everything lives in one :class:`ComputeEstimator` per
gateway process, on the hub.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass

from chaoqing.errors import ChaoqingError
from chaoqing.gateway.remote import RemoteModels

__all__ = [
    "FINISH_SECONDS_PER_OUTPUT_MEGAPIXEL",
    "MEGAPIXEL",
    "SPEED_PARAMETER",
    "ComputeEstimate",
    "ComputeEstimator",
    "Speed",
    "SpeedBasis",
]

SPEED_PARAMETER = "input_megapixels_per_s"  # model metadata: input MP one call computes per second
# composite and encode: about 0.1 s per output megapixel here (PNG at level 1 and the face
# blends of a ×4 request, docs/benchmarks.md)
FINISH_SECONDS_PER_OUTPUT_MEGAPIXEL = 0.1
MEGAPIXEL = 1_000_000
# each sum of the observed speed keeps this share at every new photo: after 10 photos of the
# same size the oldest weighs 0.7**10 ≈ 3 % of the newest
OBSERVED_DECAY = 0.7
METADATA_TIMEOUT_S = 2.0  # a refusal is decided at once; a slow metadata call falls back to the default


class SpeedBasis(enum.StrEnum):
    """Where an upscaler's speed came from (see the module notes)."""

    OBSERVED = "observed"
    METADATA = "metadata"
    DEFAULT = "default"


@dataclass(frozen=True)
class Speed:
    megapixels_per_s: float
    basis: SpeedBasis


@dataclass(frozen=True)
class ComputeEstimate:
    """Seconds one photo's compute is expected to take, and what that rests on."""

    model: str
    input_megapixels: float
    output_megapixels: float
    speed: Speed

    @property
    def background_s(self) -> float:
        return self.input_megapixels / self.speed.megapixels_per_s

    @property
    def finish_s(self) -> float:
        return self.output_megapixels * FINISH_SECONDS_PER_OUTPUT_MEGAPIXEL

    @property
    def seconds(self) -> float:
        return self.background_s + self.finish_s


@dataclass
class _Observed:
    megapixels: float = 0.0
    seconds: float = 0.0


class ComputeEstimator:
    """The upscalers' speeds (observed, published or configured) and the estimates built on
    them. Called on the hub only; holds one pair of sums per model."""

    def __init__(self, remotes: RemoteModels, default_megapixels_per_s: float) -> None:
        self.remotes = remotes
        self.default_megapixels_per_s = default_megapixels_per_s
        self._observed: dict[str, _Observed] = {}

    def observe(self, model_name: str, input_megapixels: float, seconds: float | None) -> None:
        """One photo's background: ``input_megapixels`` upscaled by ``model_name`` in
        ``seconds`` of wall time (None or not positive: nothing was measured)."""
        if seconds is None or not (seconds > 0 and input_megapixels > 0) or not math.isfinite(seconds):
            return
        observed = self._observed.setdefault(model_name, _Observed())
        observed.megapixels = observed.megapixels * OBSERVED_DECAY + input_megapixels
        observed.seconds = observed.seconds * OBSERVED_DECAY + seconds

    def speed_of(self, model_name: str) -> Speed:
        """``model_name``'s speed from the best source there is (see the module notes). Never
        raises: metadata that cannot be read leaves the default."""
        observed = self._observed.get(model_name)
        if observed is not None and observed.seconds > 0:
            return Speed(observed.megapixels / observed.seconds, SpeedBasis.OBSERVED)
        published = self._published_speed(model_name)
        if published is not None:
            return Speed(published, SpeedBasis.METADATA)
        return Speed(self.default_megapixels_per_s, SpeedBasis.DEFAULT)

    def estimate(self, model_name: str, width: int, height: int, scale: float) -> ComputeEstimate:
        """The compute of a ``width`` × ``height`` photo upscaled ``scale`` times by ``model_name``."""
        input_megapixels = width * height / MEGAPIXEL
        return ComputeEstimate(model_name, input_megapixels, input_megapixels * scale**2, self.speed_of(model_name))

    def _published_speed(self, model_name: str) -> float | None:
        if model_name not in self.remotes:
            return None
        try:  # the metadata is fetched once and cached by the client
            metadata = self.remotes[model_name].metadata(time.monotonic() + METADATA_TIMEOUT_S)
        except ChaoqingError:  # the pipeline's own call says what is wrong
            return None
        raw = metadata.parameters.get(SPEED_PARAMETER)
        if isinstance(raw, int | float) and not isinstance(raw, bool) and math.isfinite(raw) and raw > 0:
            return float(raw)
        return None
