"""A sans-IO Server-Sent Events parser: feed it lines, get the JSON `data` payloads.

Only what the command stream uses: `data:` lines (joined when an event spans several),
blank-line dispatch, comments (`: ...`) ignored, other fields ignored.
"""

from __future__ import annotations

import json

# One command is ~100 bytes; an event larger than this is not ours and is dropped
# rather than buffered (a hostile or broken proxy cannot grow the agent's memory).
MAX_EVENT_BYTES = 64 * 1024


class SseParser:
    def __init__(self) -> None:
        self._data: list[str] = []
        self._size = 0
        self.dropped = 0

    def feed_line(self, line: str) -> dict | None:
        """One line without its newline; returns a parsed JSON object at dispatch."""
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._size += len(value) + 1
            if self._size <= MAX_EVENT_BYTES:
                self._data.append(value)
        return None

    def _dispatch(self) -> dict | None:
        data, size = self._data, self._size
        self._data, self._size = [], 0
        if not data or size > MAX_EVENT_BYTES:
            if size > MAX_EVENT_BYTES:
                self.dropped += 1
            return None
        try:
            event = json.loads("\n".join(data))
        except ValueError:
            self.dropped += 1
            return None
        return event if isinstance(event, dict) else None
