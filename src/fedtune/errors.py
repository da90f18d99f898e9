"""The errors every layer raises (a module of its own, so nothing needs fedtune.config for them)."""


class ConfigError(ValueError):
    """A configuration is malformed: unknown key, wrong type or invalid value."""


class FlowerRunError(RuntimeError):
    """A run on Flower ended without its outputs; the message names the ServerApp's error on one line."""


class CredentialsError(ValueError):
    """Federation credentials cannot be made or used where asked (a file exists already, a bad host name, ...)."""


class OperatorError(RuntimeError):
    """The SuperLink cannot be started or asked (port taken, Flower CLI failure); the message says which."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, or does not fit the run being resumed."""

class HumanEvalError(RuntimeError):
    """HumanEval cannot run here (package missing, no sandbox); the message says what to do."""

class MergeError(ValueError):
    """Adapters cannot be merged (or loaded for a warm start); the message names the adapter and the reason."""

class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the model and the reason."""

class PartitionError(ValueError):
    """A partition was requested with invalid arguments, cannot satisfy its
    constraints, or a manifest on disk is missing or malformed."""

class PredictError(ValueError):
    """An input row lacks what the model's task needs; the message names the row and the field."""

class NodeConfigError(ValueError):
    """A SuperNode's node config does not say which client it is or where its data is."""

class DataError(ValueError):
    """Bad or missing data: message names the file, column or value."""


SERVER_FAILED = "fedtune ServerApp failed: "
"""The marker of the ServerApp's last log line when it raises (``fedtune run`` reads the reason after it)."""


def one_line(text: object) -> str:
    """``str(text)`` (a message, or an exception) with every run of whitespace (newlines included) collapsed to one space: an error for one log line."""
    return " ".join(str(text).split())
