"""RFC 9457 problem documents for every error the API returns."""

from __future__ import annotations

import re
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import asyncpg
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.domain import json_syntax
from services.logs import get

log = get(__name__)

MEDIA_TYPE = "application/problem+json"
_TYPE_BASE = "https://pumpwatch.dev/problems/"


class FieldError(BaseModel):
    field: str = Field(description="Where the problem is: `body.url`, `query.limit`, …")
    message: str


class ProblemDocument(BaseModel):
    """An RFC 9457 problem document."""

    type: str = Field(examples=["https://pumpwatch.dev/problems/validation"])
    title: str = Field(examples=["Request validation failed"])
    status: int = Field(examples=[422])
    detail: str = Field(examples=["query.limit: must be at most 500"])
    errors: list[FieldError] | None = None


TITLES: dict[str, str] = {
    "validation": "Request validation failed",
    "bad-cursor": "Cursor not recognised",
    "unauthenticated": "Authentication required",
    "rate-limited": "Too many failed authentications",
    "forbidden": "Not allowed for this role",
    "csrf": "Form check failed",
    "custody": "Pump not held by your clinic",
    "not-found": "Not found",
    "conflict": "Conflicts with the current state",
    "condition-holds": "The condition still holds",
    "too-many-claims": "Too many wrong claim codes",
    "unavailable": "Database unavailable",
    "too-large": "Request body too large",
    "signin-locked": "Sign-in held back after wrong passwords",
    "link-expired": "Link no longer valid",
}
"""One title per problem type (``type`` ends in the kind): the same kind always reads the same.
A kind not listed here is an HTTP status's own (``method-not-allowed``), titled by its phrase."""


class Problem(Exception):
    """Raise to answer with a problem document. Its title follows from its kind (``TITLES``)."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        kind: str | None = None,
        errors: list[FieldError] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kind = kind or _slug(status)
        self.title = TITLES.get(self.kind) or HTTPStatus(status).phrase
        self.errors = errors
        self.headers = headers


def _slug(status: int) -> str:
    return HTTPStatus(status).phrase.lower().replace(" ", "-").replace("'", "")


def not_found(what: str) -> Problem:
    return Problem(404, f"{what} not found", kind="not-found")


def response(problem: Problem) -> JSONResponse:
    body: dict[str, Any] = {
        "type": _TYPE_BASE + problem.kind,
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
    }
    if problem.errors is not None:
        body["errors"] = [e.model_dump() for e in problem.errors]
    return JSONResponse(
        body, status_code=problem.status, media_type=MEDIA_TYPE, headers=problem.headers
    )


def _location(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "request"


_WORDS: dict[str, str] = {
    "missing": "is required",
    "extra_forbidden": "is not a field of this request",
    "greater_than": "must be greater than {gt}",
    "greater_than_equal": "must be at least {ge}",
    "less_than": "must be less than {lt}",
    "less_than_equal": "must be at most {le}",
    "multiple_of": "must be a multiple of {multiple_of}",
    "finite_number": "must be a finite number",
    "string_too_short": "must have at least {min_length} characters",
    "string_too_long": "must have at most {max_length} characters",
    "too_short": "must have at least {min_length} items",
    "too_long": "must have at most {max_length} items",
    "string_pattern_mismatch": "must match the pattern {pattern}",
    "string_type": "must be a string",
    "string_unicode": "must be a valid Unicode string",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "int_parsing_size": "is too large a number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "literal_error": "must be one of {expected}",
    "enum": "must be one of {expected}",
    "uuid_type": "must be a UUID",
    "uuid_parsing": "must be a UUID",
    "datetime_type": "must be an RFC 3339 date-time",
    "datetime_parsing": "must be an RFC 3339 date-time",
    "datetime_from_date_parsing": "must be an RFC 3339 date-time",
    "datetime_object_invalid": "must be an RFC 3339 date-time",
    "timezone_aware": "must carry a time zone offset",
    "date_type": "must be a date (YYYY-MM-DD)",
    "date_parsing": "must be a date (YYYY-MM-DD)",
    "date_from_datetime_parsing": "must be a date (YYYY-MM-DD)",
    "date_from_datetime_inexact": "must be a date (YYYY-MM-DD), without a time",
    "dict_type": "must be a JSON object",
    "model_type": "must be a JSON object",
    "model_attributes_type": "must be a JSON object",
    "list_type": "must be a JSON array",
    "url_type": "must be a URL",
    "url_parsing": "must be a URL",
    "url_scheme": "must be a URL with the scheme {expected_schemes}",
    "url_too_long": "is too long a URL",
    "json_invalid": "is not valid JSON",
    "json_type": "must be JSON text",
}
"""Our words for the validation library's error types (stable identifiers): a problem
document says the same thing whichever release of the library found the error."""


_BYTE_AT = re.compile(r"\bbyte (\d+)")


def json_syntax_error(body: str | bytes) -> str:
    """Why a request body is not JSON, in our words, where it is said by line and column
    (counted from 1, columns in characters): our own diagnosis of JSON text
    (``services.domain.json_syntax``), whichever parser refused it."""
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    found = json_syntax.diagnose(raw)
    if not found:
        return "is not valid JSON"

    def place(match: re.Match[str]) -> str:
        at = min(int(match.group(1)), len(raw))
        line_start = raw.rfind(b"\n", 0, at) + 1
        line = raw.count(b"\n", 0, at) + 1
        column = len(raw[line_start:at].decode("utf-8", "replace")) + 1
        return f"line {line}, column {column}"

    return "is not valid JSON: " + _BYTE_AT.sub(place, found.removeprefix("JSON is "))


def field_error(error: Mapping[str, Any], body: object = None) -> FieldError:
    """One validation error as a field and a message in our words; ``body`` is the request
    body as received, for a JSON syntax error's line and column."""
    kind = str(error.get("type", ""))
    loc = tuple(error.get("loc", ()))
    ctx = error.get("ctx") or {}
    if kind == "json_invalid":
        loc = loc[:1]  # ("body", 30): the second part is a character offset, not a field
        if isinstance(body, str | bytes):
            return FieldError(field=_location(loc), message=json_syntax_error(body))
    if kind == "value_error" and "error" in ctx:
        message = str(ctx["error"])  # raised by our own validators, in our words
    elif kind in _WORDS:
        try:
            message = _WORDS[kind].format(**{k: _number(v) for k, v in ctx.items()})
        except (KeyError, IndexError):
            message = _WORDS[kind].split(" {")[0]
    else:
        message = str(error.get("msg", "is invalid"))
    return FieldError(field=_location(loc), message=message)


def _number(value: object) -> object:
    """0.0 as 0: a limit reads as people write it."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def validation_problem(exc: RequestValidationError) -> Problem:
    errors = [field_error(e, exc.body) for e in exc.errors()]
    detail = "; ".join(f"{e.field}: {e.message}" for e in errors[:5])
    return Problem(422, detail, kind="validation", errors=errors)


async def on_problem(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return response(exc)


async def on_validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return response(validation_problem(exc))


async def on_http(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    if exc.status_code == 404:
        detail = "no such resource"
    return response(Problem(exc.status_code, detail, headers=dict(exc.headers or {})))


async def on_data_error(request: Request, exc: Exception) -> JSONResponse:
    """A value the database cannot store (text it cannot represent, a number out of range):
    the client's mistake, named, never a 500."""
    log.info("api_data_refused", path=request.url.path, error=type(exc).__name__)
    return response(
        Problem(
            422,
            f"a value in the request cannot be stored: {exc}".splitlines()[0][:300],
            kind="validation",
        )
    )


RETRY_AFTER_S = 5
"""Retry-After of a 503 while the database is unreachable."""

DATABASE_UNAVAILABLE: tuple[type[Exception], ...] = (
    # Refused or reset connections, DNS failures, connect and pool-acquire timeouts
    # (TimeoutError is an OSError).
    OSError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    # A pooled connection the server dropped mid-protocol (see storage.database.DATABASE_ERRORS).
    asyncpg.InternalClientError,
)
"""Exceptions that mean the database cannot be reached now (not that the request is wrong)."""


def unavailable() -> Problem:
    return Problem(
        503,
        "the database cannot be reached; try again shortly",
        kind="unavailable",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


async def on_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """The database is down or unreachable: 503 with Retry-After, never a 500. The pool
    reconnects by itself, so the API recovers without a restart."""
    log.warning("api_database_unavailable", path=request.url.path, error=type(exc).__name__)
    return response(unavailable())


async def on_interface_error(request: Request, exc: Exception) -> JSONResponse:
    """asyncpg's "the underlying connection is closed", raised when a transaction ends on a
    connection the server dropped mid-statement: the database was unavailable (503), as the
    error it replaced says; any other interface error is a bug (500)."""
    if isinstance(exc.__context__, DATABASE_UNAVAILABLE):
        return await on_unavailable(request, exc.__context__)
    return await on_error(request, exc)


async def on_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("api_unhandled_error", path=request.url.path, error=repr(exc), exc_info=exc)
    return response(Problem(500, "the server failed to answer; the error is logged"))


PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {
        "model": ProblemDocument,
        "description": description,
        "content": {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/ProblemDocument"}}},
    }
    for status, description in {
        400: "Malformed request (a bad cursor, say)",
        401: "No key, or an unknown or revoked one",
        403: "The key's role may not do this",
        404: "No such resource, or one of another clinic",
        409: "Conflicts with the current state",
        413: "Request body too large",
        422: "Request validation failed (field-level `errors`)",
        429: "Too many failed authentications from this source",
        503: "The database cannot be reached (Retry-After says when to try again)",
    }.items()
}
