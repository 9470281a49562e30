"""The error every bad model setting raises (re-exported by ``model.config``)."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""
