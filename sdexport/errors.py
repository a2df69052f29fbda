"""The exceptions sdexport raises; each message names the value or file at fault and what to do."""


class SdexportError(Exception):
    """Base class of every error sdexport raises on purpose."""


class SourceError(SdexportError):
    """The model source (preset, hub id, folder, weights, LoRA) cannot be used."""


class ValidationError(SdexportError):
    """An exported graph differs from the torch model beyond the component's tolerance."""


class ArtifactError(SdexportError):
    """A compiled folder is unfinished, edited, truncated or otherwise unusable."""


class BuildLockedError(SdexportError):
    """Another build holds the folder's lock."""


class CompatibilityError(SdexportError):
    """A compiled engine does not fit the environment it is loaded in."""


class UsageError(SourceError):
    """A command-line value is not one of the allowed choices (the CLI exits with code 2)."""
