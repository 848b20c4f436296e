"""Exceptions raised for bad input. Every message names the file or value and says what to do."""


class OMSError(Exception):
    """Base class of every error this package raises on purpose."""


class ModuleFileError(OMSError):
    """An OMS module file or folder is missing, truncated, corrupt, pickled, or does not match its config."""


class LatentSpaceError(OMSError):
    """An OMS module was made for another latent space than the checkpoint it is used with."""


class TextEncoderError(OMSError):
    """The OMS text encoder is missing, unreadable, of the wrong width, or cannot give the requested layer."""


class ModuleMissingError(ModuleFileError):
    """No OMS module for the checkpoint's latent space is on disk (one can be downloaded)."""


class TextEncoderMissingError(TextEncoderError):
    """The text encoder an OMS module needs is nowhere on disk (it can be downloaded)."""


class DownloadError(OMSError):
    """A download of OMS files failed, was stopped, or cannot be made (offline, no space, no such file)."""
