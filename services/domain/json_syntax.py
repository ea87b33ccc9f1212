"""Why bytes are not one JSON value: the first problem, in our words, with its byte offset.

Off the hot path: the decoder calls :func:`diagnose` only for a payload its parser refused, so
that a quarantine detail says the same thing whichever parser (or parser version) refused it.
The scan is the grammar of RFC 8259 with the contract's extra refusals (NaN and Infinity,
numbers that overflow a double, lone surrogate escapes), iterative so that deep nesting cannot
exhaust the stack, and regular expressions for the long runs (strings, numbers).

Pure code: no I/O.
"""

from __future__ import annotations

import math
import re

_WS = b" \t\r\n"
_STRING = re.compile(rb'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*')
"""An opening quote and the longest run of valid string content after it."""
_ESCAPE_PREFIX = re.compile(rb"\\(?:u[0-9a-fA-F]{0,3})?\Z")
"""The start of an escape cut off by the end of the payload."""
_ESCAPE = re.compile(rb"\\(u[0-9a-fA-F]{4}|.)", re.DOTALL)
_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_RUN = re.compile(rb"[-+0-9.eE]*")
_LITERALS = (b"true", b"false", b"null")
_NON_NUMBERS = (b"-Infinity", b"Infinity", b"NaN")
_CLOSER = {b"{"[0]: "}", b"["[0]: "]"}


class _Found(Exception):
    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


def diagnose(raw: bytes) -> str:
    """The first reason ``raw`` is not exactly one JSON value (``""`` if it is one)."""
    if not raw.strip(_WS):
        return "payload is empty"
    try:
        _scan(raw)
    except _Found as found:
        return found.problem
    return ""


def _truncated(raw: bytes) -> _Found:
    return _Found(f"JSON is truncated: the payload ends (at byte {len(raw)}) inside a value")


def _malformed(at: int, what: str) -> _Found:
    return _Found(f"JSON is malformed at byte {at}: {what}")


def _skip(raw: bytes, at: int) -> int:
    end = len(raw)
    while at < end and raw[at] in _WS:
        at += 1
    return at


def _scan(raw: bytes) -> None:
    """Walk the grammar; raise :class:`_Found` at the first problem."""
    stack: list[int] = []  # the opening bytes of the containers we are in
    at = 0
    expect_value = True
    while True:
        if expect_value:
            at, opened = _value(raw, at)
            if opened is not None:
                at = _skip(raw, at)
                if at >= len(raw) or raw[at] != ord(_CLOSER[opened]):
                    stack.append(opened)
                    if opened == ord("{"):
                        at = _key(raw, at, first=True)
                    continue
                at += 1  # an empty container is a whole value
        at = _skip(raw, at)
        if not stack:
            if at < len(raw):
                raise _malformed(at, "text after the end of the JSON value")
            return
        at, expect_value = _after_member(raw, at, stack)


def _after_member(raw: bytes, at: int, stack: list[int]) -> tuple[int, bool]:
    """After a value inside a container: a comma (then the next key, in an object) or the
    container's closer. Returns where to go on and whether a value comes next."""
    if at >= len(raw):
        raise _truncated(raw)
    closer = _CLOSER[stack[-1]]
    if raw[at] == ord(closer):
        stack.pop()
        return at + 1, False
    if raw[at] != ord(","):
        raise _malformed(at, f"expected ',' or '{closer}', found {_shown(raw, at)}")
    if stack[-1] == ord("{"):
        return _key(raw, at + 1, first=False), True
    return at + 1, True


def _key(raw: bytes, at: int, *, first: bool) -> int:
    """A member's key and its colon; returns where the member's value starts."""
    at = _skip(raw, at)
    if at >= len(raw):
        raise _truncated(raw)
    if raw[at] != ord('"'):
        wanted = "a string key or '}'" if first else "a string key after ','"
        raise _malformed(at, f"expected {wanted}, found {_shown(raw, at)}")
    at = _skip(raw, _string(raw, at))
    if at >= len(raw):
        raise _truncated(raw)
    if raw[at] != ord(":"):
        raise _malformed(at, f"expected ':' after a key, found {_shown(raw, at)}")
    return at + 1


def _value(raw: bytes, at: int) -> tuple[int, int | None]:
    """One scalar (returns its end and None) or the opening of a container (its byte)."""
    at = _skip(raw, at)
    if at >= len(raw):
        raise _truncated(raw)
    byte = raw[at]
    if byte in _CLOSER:
        return at + 1, byte
    if byte == ord('"'):
        return _string(raw, at), None
    rest = raw[at:]
    for word in _NON_NUMBERS:
        if rest.startswith(word):
            name = word.lstrip(b"-").decode()
            raise _Found(f"JSON is malformed: {name} is not a JSON number (byte {at})")
    if byte == ord("-") or ord("0") <= byte <= ord("9"):
        return _number(raw, at), None
    for word in _LITERALS:
        if rest.startswith(word):
            return at + len(word), None
        if word.startswith(rest):
            raise _truncated(raw)
    raise _malformed(at, f"expected a value, found {_shown(raw, at)}")


def _number(raw: bytes, at: int) -> int:
    run = _NUMBER_RUN.match(raw, at)
    assert run is not None  # the pattern matches the empty string
    text = run[0]
    number = _NUMBER.match(raw, at)
    cut_off = run.end() == len(raw) and (number is None or number.end() < run.end())
    if cut_off and _NUMBER.fullmatch(text + b"0"):
        raise _truncated(raw)
    if number is None:
        raise _malformed(at, f"a number is malformed: {text[:20].decode()}")
    try:
        infinite = math.isinf(float(number[0]))
    except OverflowError:
        infinite = True
    if infinite:
        raise _Found(f"a number overflows a double (byte {at})")
    return number.end()


def _string(raw: bytes, at: int) -> int:
    """A string starting at its quote: returns the index after its closing quote."""
    run = _STRING.match(raw, at)
    assert run is not None  # raw[at] is the quote
    end = run.end()
    closed = end < len(raw) and raw[end] == ord('"')
    _check_text(raw, at + 1, end, closed=closed)
    if closed:
        return end + 1
    if end >= len(raw) or _ESCAPE_PREFIX.match(raw, end):
        raise _truncated(raw)
    if raw[end] == ord("\\"):
        raise _malformed(end, f"an invalid escape in a string: {_shown(raw, end, 6)}")
    raise _malformed(end, f"a string holds the control character {_shown(raw, end)}")


def _check_text(raw: bytes, start: int, end: int, *, closed: bool) -> None:
    """The content of a string: UTF-8, and every surrogate escape in a pair (a high one at the
    end of an unclosed run is left to the caller: the payload may have been cut after it)."""
    body = raw[start:end]
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Found(f"payload is not valid UTF-8 (byte {start + exc.start})") from None
    if b"\\u" not in body:
        return
    high: re.Match[bytes] | None = None  # a high surrogate escape waiting for its low half
    for escape in _ESCAPE.finditer(body):
        unit = escape[1]
        code = int(unit[1:], 16) if len(unit) == 5 else -1
        if high is not None:
            if escape.start() != high.end() or not 0xDC00 <= code <= 0xDFFF:
                raise _lone(start + high.start())
            high = None
        elif 0xD800 <= code <= 0xDBFF:
            high = escape
        elif 0xDC00 <= code <= 0xDFFF:
            raise _lone(start + escape.start())
    if high is not None and (closed or high.end() < len(body)):
        raise _lone(start + high.start())


def _lone(at: int) -> _Found:
    return _Found(f"a string contains a lone surrogate escape (\\ud800-\\udfff, byte {at})")


def _shown(raw: bytes, at: int, length: int = 1) -> str:
    """The bytes at ``at`` as a person reads them: printable ASCII quoted, others in hex."""
    piece = raw[at : at + length]
    if all(0x20 <= b < 0x7F for b in piece):
        return repr(piece.decode())
    return "byte 0x" + piece[:1].hex()
