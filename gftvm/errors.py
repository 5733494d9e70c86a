"""The exceptions gftvm raises. Each names the file, op, node or tensor at fault."""


class GftvmError(Exception):
    """Base class of every error gftvm raises on purpose."""


class ModelError(GftvmError):
    """The input model cannot be read or is not a valid ONNX model."""


class UnsupportedOpError(GftvmError):
    """An op that the frontend cannot import or differentiate."""


class ConfigError(GftvmError):
    """An invalid compile option (trainable set, optimizer, target, ...)."""


class InputError(GftvmError):
    """A tensor passed to the runtime has the wrong shape or dtype."""


class ArtifactError(GftvmError):
    """An artifact directory is missing a file, is corrupted, or was built for another target."""


class CheckpointError(GftvmError):
    """A checkpoint is unreadable, truncated, or does not belong to the artifact."""
