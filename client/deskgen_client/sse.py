"""A server-sent events parser (the WHATWG ``text/event-stream`` rules), fed one line at a time.

It does no I/O: the sync and the async client feed it the lines httpx reads (``iter_lines`` /
``aiter_lines`` already split on ``\\n``, ``\\r\\n`` and ``\\r``), so both parse a stream identically.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSentEvent:
    """One dispatched event: its name (``message`` when the stream named none), its data (the ``data:``
    lines joined by newlines), and the last ``id:`` seen."""

    event: str
    data: str
    id: str | None = None
    retry_ms: int | None = None


class SSEParser:
    """Lines in, events out. A blank line dispatches the event built so far; ``:`` starts a comment;
    an unknown field is ignored; a block with no ``data:`` line is not an event (WHATWG §9.2.6). An event
    whose closing blank line never came is never dispatched, as in a browser: the caller learns from
    the missing ``done`` that the stream was cut."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []
        self._last_id: str | None = None
        self._retry_ms: int | None = None

    def feed(self, line: str) -> ServerSentEvent | None:
        """Take one line (without its line break); return the event a blank line completes."""
        line = line.rstrip("\r\n")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry":
            if value.isdigit():
                self._retry_ms = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        if not self._data:
            self._event = ""
            return None
        event = ServerSentEvent(self._event or "message", "\n".join(self._data), self._last_id, self._retry_ms)
        self._event, self._data = "", []
        return event


def parse_events(text: str) -> list[ServerSentEvent]:
    """Every complete event of a whole stream body (tests, and callers that read the body at once)."""
    parser = SSEParser()
    events = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        event = parser.feed(line)
        if event is not None:
            events.append(event)
    return events
