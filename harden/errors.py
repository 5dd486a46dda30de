"""Exceptions that map to the CLI's exit codes (DESIGN.md: 1 gate, 2 bad input, 3 internal)."""


class HardenError(Exception):
    """Base class for errors harden reports to the user without a traceback."""

    exit_code = 3


class InputError(HardenError):
    """Bad usage or invalid input: a file, option or value the user can fix (exit code 2)."""

    exit_code = 2


class GateFailed(HardenError):
    """A resilience gate given on the command line was not met (exit code 1)."""

    exit_code = 1


class OutputError(HardenError):
    """The environment refused an output (disk full, permission denied, read-only file system):
    one clear line and exit code 2, like bad input, never "internal error"."""

    exit_code = 2
