"""One exception hierarchy for sdrt. Messages say what was expected, what was given, and how to fix it."""


class SdrtError(Exception):
    """Base class of every error sdrt raises on purpose."""


class ArtifactError(SdrtError):
    """The artifact directory is missing, incomplete, tampered with, or of another schema."""


class InputError(SdrtError, ValueError):
    """A caller passed arguments the pipeline or a session cannot accept."""


class BackendError(SdrtError):
    """A backend (onnxruntime, TensorRT) is unavailable or failed."""


class ExportError(SdrtError):
    """Exporting or verifying a component failed."""


class NumericalError(SdrtError):
    """A component produced NaN or infinity (e.g. an fp16 graph overflowing): no image is returned."""
