"""Errors the command line reports as the user's to fix, not as a crash."""


class ConfigError(ValueError):
    """A config file that cannot be used, with every problem named."""
