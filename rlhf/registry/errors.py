"""The registry's one error type, apart so that every registry module can raise it."""


class ModelLoadError(RuntimeError):
    """A model name that cannot be resolved or loaded; the message says what was tried."""
