"""The errors lorakit raises for a user's mistake.

Every message names what is wrong (the file, key, field or module) and what to do about it. The command
line prints these without a traceback; anything else escaping is a bug in lorakit.
"""


class LorakitError(Exception):
    """Base class: a problem with the user's input, explained in the message."""


class ConfigError(LorakitError, ValueError):
    """A LoRA configuration holds an impossible or unsupported value."""


class TargetError(LorakitError, ValueError):
    """`target_modules` / `exclude_modules` / `modules_to_save` do not fit the model."""


class AdapterError(LorakitError, ValueError):
    """An adapter name or state does not allow the requested operation."""


class AdapterUnloadedError(AdapterError):
    """A queued request's adapter was unloaded or replaced before the request could start."""

    def __init__(self, name: str):
        super().__init__(f"the adapter {name!r} was unloaded or replaced while this request waited; send the "
                         "request again")


class AdapterFileError(LorakitError, ValueError):
    """An adapter folder or weights file is missing, unsafe, corrupt or does not fit the model."""


class DataError(LorakitError, ValueError):
    """A training or evaluation data file is missing, malformed, or holds rows that cannot be used."""


class TrainError(LorakitError, ValueError):
    """A training run cannot start or continue as asked (a bad setting, an occupied output folder, no memory)."""


class ModelError(LorakitError, ValueError):
    """A base model cannot be found or loaded."""


class RequestError(LorakitError, ValueError):
    """A generation request holds an impossible value (an empty prompt, max_tokens past the context, ...)."""


class UnknownModelError(LorakitError, KeyError):
    """A request names a model that is neither the base model nor a registered adapter."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class QueueFullError(LorakitError):
    """The engine's queue of waiting requests is full; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class EngineStoppedError(LorakitError):
    """The engine is draining or stopped and takes no new requests."""


class SignatureError(LorakitError, ValueError):
    """An adapter's signature is missing, made by another key or for other files, or cannot be made."""
