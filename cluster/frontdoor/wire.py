"""Name the field that holds invalid UTF-8, by walking a message's wire format.

protobuf's parser rejects a string field with bad UTF-8 but does not say
which one; clients deserve ``chat.messages[1].content: is not valid UTF-8``.
Generic over a message descriptor: no generated type is imported here.
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class _Malformed(Exception):
    pass


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _Malformed
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _walk(data: bytes, desc: Descriptor, prefix: str) -> str | None:
    seen: dict[int, int] = {}  # field number -> occurrences so far: the index of a repeated element
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            _, pos = _varint(data, pos)
        elif wire_type in (_I64, _I32):
            pos += 8 if wire_type == _I64 else 4
        elif wire_type == _LEN:
            size, pos = _varint(data, pos)
            payload, pos = data[pos : pos + size], pos + size
            if pos > len(data):
                raise _Malformed
            found = _check_field(desc.fields_by_number.get(number), payload, prefix, seen, number)
            if found:
                return found
        else:  # groups (3, 4) are not in our API; anything else is not protobuf
            raise _Malformed
    return None


def _check_field(
    field: FieldDescriptor | None, payload: bytes, prefix: str, seen: dict[int, int], number: int
) -> str | None:
    if field is None:  # an unknown field: protobuf keeps its bytes without decoding them
        return None
    name = prefix + field.name
    if field.is_repeated:
        index = seen.get(number, 0)
        seen[number] = index + 1
        name += f"[{index}]"
    if field.type == FieldDescriptor.TYPE_STRING:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            return name
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        return _walk(payload, field.message_type, name + ".")
    return None


def find_invalid_utf8(data: bytes, desc: Descriptor) -> str | None:
    """The path of the first string field in ``data`` that is not UTF-8 (``a.b[2].c``), or None."""
    try:
        return _walk(data, desc, "")
    except _Malformed:
        return None
