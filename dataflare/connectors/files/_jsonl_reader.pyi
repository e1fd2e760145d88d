# Types of the native JSON lines reader built from _jsonl_reader.cpp.

from typing import Any

Column = tuple[int, bytes | None, bytes, bytes | None]
"""Null count, validity bitmap or None, values, offsets (strings) or None."""

def read_block(
    block: bytes | bytearray, fields: tuple[tuple[str, int], ...]
) -> tuple[int, list[Column]] | None: ...

class HeadStart:
    def __init__(
        self,
        path: str,
        fields: tuple[tuple[str, int], ...],
        block_size: int,
        limit: int,
    ) -> None: ...
    def finish(self, *, wait: bool = False) -> dict[str, Any]: ...
    def take(self) -> tuple[Any, bytes | None] | None: ...
