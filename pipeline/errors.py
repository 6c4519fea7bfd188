"""Error types whose class decides the process exit code."""


class UsageError(Exception):
    """Bad input (params, data, model, policy): one line for the user, exit code 2."""


class GateFailed(Exception):
    """The evidence falls short of a blocking requirement: exit code 1."""
