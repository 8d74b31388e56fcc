"""Errors shared by the layers that start things (engine, data planes) and the CLI that reports them."""


class StartupError(Exception):
    """The balancer cannot start; the message says why and what to do."""
