"""Exceptions the CLI turns into one clear message and a non-zero exit (no traceback)."""


class N2GError(Exception):
    """Base class for errors a user can act on; the message names the file(s) and the problem."""


class InputError(N2GError):
    """An input (image file, series folder, manifest) is missing, unreadable or inconsistent."""


class ConfigError(N2GError):
    """A configuration file or command-line override is invalid."""
