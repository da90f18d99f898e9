"""The configuration error every layer raises (a module of its own, so nothing needs fedtune.config for it)."""


class ConfigError(ValueError):
    """A configuration is malformed: unknown key, wrong type or invalid value."""
