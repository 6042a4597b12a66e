"""PyTorch model files of the user's own, loaded by spandrel and run on :class:`TorchBackend`.

spandrel (github.com/chaiNNer-org/spandrel, MIT) recognises an architecture from a state
dict's keys and shapes — ESRGAN/RRDBNet, Real-ESRGAN's Compact, SPAN, SwinIR, HAT, DAT,
OmniSR, PLKSR and some 40 more — and builds the network with the file's hyper-parameters. Its
:class:`spandrel.ImageModelDescriptor` says what the network is: its ``scale``, input and
output channels, ``purpose`` (``SR``, ``Restoration``, ``FaceSR``), size requirements (a
multiple of a window size, a minimum) and whether it takes fp16; calling it pads the input to
those requirements and crops the output back. ``spandrel_extra_arches``, when installed, adds
its architectures (SRFormer, and the face restorer CodeFormer; face models are served by
:mod:`chaoqing.modelserver.runners.face_restorer`, checked by :func:`check_face_restorer`).

Files are read with spandrel's restricted unpickler (state dicts of tensors only, no code),
``.safetensors`` with safetensors.

torchvision: spandrel imports ``torchvision.transforms.functional`` when it is imported (for
two architectures: LaMa's ``rotate``, RestoreFormer's ``normalize``), though no upscaler uses
it. A torchvision from PyPI does not import beside a CPU build of torch ("operator
torchvision::nms does not exist"), and a matching one is not on PyPI; so where torchvision
does not import, :func:`import_spandrel` gives spandrel a stand-in module with those names:
``normalize`` computed as torchvision does, ``rotate`` refused (docs/models.md says how to
install spandrel without torchvision).

Importing this module imports torch; :mod:`chaoqing.modelserver.runners.user_models` imports it
only when a PyTorch file is loaded.
"""

from __future__ import annotations

import enum
import logging
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from chaoqing.errors import RunnerError
from chaoqing.modelserver.runners.backends import Device
from chaoqing.modelserver.runners.torch_backend import TorchBackend, TorchOptions, torch_options

__all__ = [
    "SPANDREL_INSTALL_HINT",
    "SpandrelModule",
    "check_face_restorer",
    "check_upscaler",
    "create_spandrel_backend",
    "import_spandrel",
    "load_descriptor",
    "supported_architectures",
]

_log = logging.getLogger("chaoqing.modelserver.runners.spandrel_backend")

SPANDREL_INSTALL_HINT = ("pip install 'chaoqing[spandrel]' && pip install --no-deps spandrel==0.4.2 "
                         "spandrel-extra-arches==0.2.0 (docs/models.md)")
RGB_CHANNELS = 3
# what a model of kind "upscaler" may be, by spandrel's purpose: super-resolution, or a 1× restorer
UPSCALER_PURPOSES = ("SR", "Restoration")
FACE_PURPOSE = "FaceSR"  # what a model of kind "face-restorer" is (chaoqing.modelserver.runners.face_restorer)
TORCHVISION_MODULES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


class InterpolationMode(enum.Enum):
    """torchvision.transforms.InterpolationMode's members, for the stand-in."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _normalize(tensor: torch.Tensor, mean: Sequence[float], std: Sequence[float], inplace: bool = False) -> torch.Tensor:
    """torchvision.transforms.functional.normalize on a tensor: (x - mean) / std per channel."""
    mean_tensor = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    std_tensor = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    if inplace:
        return tensor.sub_(mean_tensor).div_(std_tensor)
    return (tensor - mean_tensor) / std_tensor


def _rotate(*arguments: Any, **keywords: Any) -> torch.Tensor:
    raise RunnerError("this model needs torchvision's rotate (spandrel's LaMa, an inpainting model chaoqing "
                      "does not serve), and torchvision does not import here")


def _install_torchvision_stand_in() -> None:
    """Put a ``torchvision.transforms.functional`` with the names spandrel imports into sys.modules."""
    for name in list(sys.modules):  # what a broken torchvision left half-imported
        if name == "torchvision" or name.startswith("torchvision."):
            del sys.modules[name]
    package = types.ModuleType("torchvision", "chaoqing's stand-in: the names spandrel imports")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.normalize = _normalize  # type: ignore[attr-defined]
    functional.rotate = _rotate  # type: ignore[attr-defined]
    functional.InterpolationMode = InterpolationMode  # type: ignore[attr-defined]
    transforms.functional = functional  # type: ignore[attr-defined]
    transforms.InterpolationMode = InterpolationMode  # type: ignore[attr-defined]
    package.transforms = transforms  # type: ignore[attr-defined]
    sys.modules.update(zip(TORCHVISION_MODULES, (package, transforms, functional), strict=True))


def import_spandrel() -> types.ModuleType:
    """spandrel, with spandrel_extra_arches' architectures when that is installed.

    Raises RunnerError saying what to install when spandrel is missing.
    """
    if "spandrel" not in sys.modules:
        try:
            import torchvision.transforms.functional  # noqa: F401
        except (ImportError, RuntimeError) as exc:  # a torchvision built for another torch raises RuntimeError
            _log.debug("torchvision does not import here (%s); spandrel gets the stand-in", exc)
            _install_torchvision_stand_in()
    try:
        import spandrel
    except ImportError as exc:
        raise RunnerError(f"PyTorch model files need spandrel, which is not installed: {SPANDREL_INSTALL_HINT}") from exc
    module: types.ModuleType = spandrel
    try:
        import spandrel_extra_arches
    except ImportError:
        return module
    spandrel_extra_arches.install(ignore_duplicates=True)  # once; again it adds nothing
    return module


def supported_architectures() -> list[str]:
    """The architectures spandrel recognises here, by id."""
    spandrel = import_spandrel()
    return [str(support.architecture.id) for support in spandrel.MAIN_REGISTRY.architectures()]


def load_descriptor(path: Path, where: str) -> Any:
    """The spandrel ImageModelDescriptor of the file at ``path`` (``where`` names its config key
    in messages), on the CPU, in fp32.

    Raises RunnerError, in one line naming the file and what was expected, when it is not a
    state dict, spandrel recognises no architecture in it, or the architecture cannot be built
    from it; and when spandrel is not installed, saying how to install it.
    """
    try:
        spandrel = import_spandrel()
    except RunnerError as exc:
        raise RunnerError(f"{where}: {exc}") from exc
    loader = spandrel.ModelLoader(device="cpu")
    try:
        state_dict = loader.load_state_dict_from_file(path)
    except Exception as exc:  # torch.load and safetensors raise many kinds for a bad file
        raise RunnerError(f"{where}: {path} is not a PyTorch state dict ({type(exc).__name__}: "
                          f"{_first_line(exc)})") from exc
    if not isinstance(state_dict, dict) or not state_dict:
        raise RunnerError(f"{where}: {path} holds no state dict of tensors")
    try:
        descriptor = loader.load_from_state_dict(state_dict)
    except spandrel.UnsupportedModelError as exc:
        raise RunnerError(f"{where}: {path} is not a state dict spandrel recognises (supported: "
                          f"{', '.join(supported_architectures())})") from exc
    except Exception as exc:  # an architecture's own loader failing on odd shapes or keys
        raise RunnerError(f"{where}: {path} looks like a network spandrel knows but does not load "
                          f"({type(exc).__name__}: {_first_line(exc)})") from exc
    return descriptor


def check_upscaler(descriptor: Any, path: Path, where: str) -> None:
    """Raises RunnerError unless ``descriptor`` is an RGB → RGB image model that upscales (or restores at 1×)."""
    architecture = descriptor.architecture.name
    if not isinstance(descriptor, _image_descriptor_class()) or descriptor.purpose not in UPSCALER_PURPOSES:
        purpose = getattr(descriptor, "purpose", type(descriptor).__name__)
        raise RunnerError(f"{where}: {path} is a {architecture} model for {purpose}, not an upscaler "
                          f"(kind = \"upscaler\" takes {' or '.join(UPSCALER_PURPOSES)} models)")
    if descriptor.input_channels != RGB_CHANNELS or descriptor.output_channels != RGB_CHANNELS:
        raise RunnerError(f"{where}: {path} is a {architecture} model from {descriptor.input_channels} to "
                          f"{descriptor.output_channels} channels; chaoqing's upscalers take RGB to RGB (3 to 3)")


def check_face_restorer(descriptor: Any, path: Path, where: str) -> None:
    """Raises RunnerError unless ``descriptor`` is an RGB → RGB face model (spandrel's purpose
    ``FaceSR``: GFPGAN, RestoreFormer, CodeFormer) at scale 1."""
    architecture = descriptor.architecture.name
    purpose = getattr(descriptor, "purpose", type(descriptor).__name__)
    if not isinstance(descriptor, _image_descriptor_class()) or purpose != FACE_PURPOSE:
        raise RunnerError(f"{where}: {path} is a {architecture} model for {purpose}, not a face restorer "
                          f"(kind = \"face-restorer\" takes {FACE_PURPOSE} models: GFPGAN, CodeFormer, RestoreFormer)")
    if descriptor.input_channels != RGB_CHANNELS or descriptor.output_channels != RGB_CHANNELS or descriptor.scale != 1:
        raise RunnerError(f"{where}: {path} is a {architecture} model from {descriptor.input_channels} to "
                          f"{descriptor.output_channels} channels at ×{descriptor.scale}; a face restorer takes "
                          f"RGB to RGB (3 to 3) at ×1")


def _image_descriptor_class() -> type[Any]:
    spandrel = import_spandrel()
    image_descriptor: type[Any] = spandrel.ImageModelDescriptor
    return image_descriptor


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no detail"


class SpandrelModule(torch.nn.Module):
    """A descriptor as a module for :class:`TorchBackend`: NCHW in [0, 1] in, out ×scale, clamped
    to [0, 1], the input padded to the architecture's size requirements and the output cropped
    back (spandrel's own call, which takes batches as well as single images)."""

    def __init__(self, descriptor: Any) -> None:
        super().__init__()
        self.descriptor = descriptor
        self.network = descriptor.model  # registered, so .to() moves its weights

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = self.descriptor(batch)
        return output


def create_spandrel_backend(descriptor: Any, device: Device, *, model_name: str, threads: int = 0,
                            max_items: int = 8, options: TorchOptions | None = None) -> TorchBackend:
    """``descriptor``'s network on ``device`` as the bundled torch models run: fp16 on a GPU when
    the architecture supports it (else fp32), channels_last, up to ``max_items`` images per
    forward; ``options`` overrides that choice (tests run the CUDA path's options on the CPU).

    Raises RunnerError when torch cannot place it on the device.
    """
    if options is None:
        options = torch_options(device)
        if options.half and not descriptor.supports_half:
            options = TorchOptions(half=False, channels_last=options.channels_last)
    return TorchBackend(SpandrelModule(descriptor), device, options, model_name=model_name,
                        scale=int(descriptor.scale), threads=threads, max_items=max_items)
