"""The error of an invalid setting or input file (a leaf module: every stage may raise it)."""


class ConfigError(ValueError):
    """An invalid setting; the one-line message names the flag or file and what is allowed."""
