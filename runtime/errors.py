"""One exception hierarchy for sdrt. Messages say what was expected, what was given, and how to fix it."""

import uuid

MAX_MESSAGE = 2000  # characters: a message echoing a huge refused value stays readable, and a response small


class SdrtError(Exception):
    """Base class of every error sdrt raises on purpose. A message longer than MAX_MESSAGE characters is cut there,
    saying how long it was (values are summarized where they are described: ``validation.describe``)."""

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str) and len(args[0]) > MAX_MESSAGE:
            text = args[0]
            args = (f"{text[: MAX_MESSAGE - 60]}... (message cut: {len(text):,} characters in all)",)
        super().__init__(*args)


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


class InternalError(SdrtError):
    """An unexpected failure inside sdrt or a library it drives (not a refusal of the request's input): what a
    batch answers in that call's slot instead of the library's raw exception, with an id to find the traceback
    that was logged under it."""

    def __init__(self, what: str = "generation", request_id: str | None = None):
        request_id = request_id or uuid.uuid4().hex[:12]  # a new id unless one is given
        super().__init__(
            f"internal error: {what} failed unexpectedly (request id {request_id}; the server's log has the details "
            "under that id)"
        )
        self.request_id = request_id
