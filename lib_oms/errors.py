"""Exceptions raised for bad input. Every message names the file or value and says what to do."""


class OMSError(Exception):
    """Base class of every error this package raises on purpose."""


class ModuleFileError(OMSError):
    """An OMS module file or folder is missing, truncated, corrupt, pickled, or does not match its config."""


class LatentSpaceError(OMSError):
    """An OMS module was made for another latent space than the checkpoint it is used with."""


class TextEncoderError(OMSError):
    """The OMS text encoder is missing, unreadable, of the wrong width, or cannot give the requested layer."""
