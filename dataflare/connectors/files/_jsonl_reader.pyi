# Types of the native JSON lines reader built from _jsonl_reader.cpp.

Column = tuple[int, bytes | None, bytes, bytes | None]
"""Null count, validity bitmap or None, values, offsets (strings) or None."""

def read_block(
    block: bytes | bytearray, fields: tuple[tuple[str, int], ...]
) -> tuple[int, list[Column]] | None: ...
