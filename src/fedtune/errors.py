"""The errors every layer raises (a module of its own, so nothing needs fedtune.config for them)."""


class ConfigError(ValueError):
    """A configuration is malformed: unknown key, wrong type or invalid value."""


class FlowerRunError(RuntimeError):
    """A run on Flower ended without its outputs; the message names the ServerApp's error on one line."""


class CredentialsError(ValueError):
    """Federation credentials cannot be made or used where asked (a file exists already, a bad host name, ...)."""


class OperatorError(RuntimeError):
    """The SuperLink cannot be started or asked (port taken, Flower CLI failure); the message says which."""


SERVER_FAILED = "fedtune ServerApp failed: "
"""The marker of the ServerApp's last log line when it raises (``fedtune run`` reads the reason after it)."""


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space: an error for one log line."""
    return " ".join(str(text).split())
