"""The one error a configuration raises."""

from __future__ import annotations


class ConfigurationError(Exception):
    """A config file that cannot be used; the message names the file, the key and the reason."""
