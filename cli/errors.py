"""The one base class of errors meant for users: the CLI prints them, the service maps them to HTTP."""


class PgtttError(Exception):
    """An error caused by the input (a file, a field, a value), with a message that names it."""
