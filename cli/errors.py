"""The one base class of errors meant for users: the CLI prints them, the service maps them to HTTP."""

from typing import Any


class PgtttError(Exception):
    """An error caused by the input (a file, a field, a value), with a message that names it; ``field`` and
    ``value`` say which setting and value it is about, where there is one, so nobody parses the message."""

    def __init__(self, message: str = "", *, field: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.field, self.value = field, value
