"""sdrt runtime: Stable Diffusion on exported ONNX/TensorRT graphs with NumPy, no torch.

Importing this package costs only NumPy; backends load their library when a session opens.
"""

from importlib import metadata as _metadata

from sdrt.runtime.errors import ArtifactError, BackendError, ExportError, InputError, InternalError, SdrtError
from sdrt.runtime.manifest import Manifest
from sdrt.runtime.pipeline import GenerationResult, Pipeline

try:
    __version__ = _metadata.version("sdrt")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "ArtifactError",
    "BackendError",
    "ExportError",
    "GenerationResult",
    "InputError",
    "InternalError",
    "Manifest",
    "Pipeline",
    "SdrtError",
    "__version__",
]
