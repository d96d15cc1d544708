"""Server-sent events (``text/event-stream``) as :class:`Event` objects: what ``GET /jobs/{id}/events`` streams."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Event:
    """One server-sent event: ``event`` is ``progress``, ``state`` or ``end``; ``data`` the parsed JSON (or text)."""

    event: str
    data: Any
    id: str | None = None


def iter_sse(lines: Iterator[str]) -> Iterator[Event]:
    """Events of a ``text/event-stream`` body given line by line (the WHATWG rules: ``data`` lines joined with
    newlines, comments and unknown fields ignored, an event dispatched at each blank line)."""
    name, data, event_id = "", [], None
    for line in lines:
        if line == "":
            if data:
                text = "\n".join(data)
                try:
                    payload: Any = json.loads(text)
                except ValueError:
                    payload = text
                yield Event(name or "message", payload, event_id)
            name, data = "", []
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if key == "event":
            name = value
        elif key == "data":
            data.append(value)
        elif key == "id":
            event_id = value
