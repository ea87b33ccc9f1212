"""FHIR ``OperationOutcome``: what the FHIR routes answer on an error (auth, tenancy, validation,
a bad cursor), with the status and headers the rest of the API would answer and the API's problem
type in ``issue.details.coding``; and the error responses their OpenAPI operations document."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from services.api.fhir.resources import FHIR_JSON, FhirResponse
from services.api.problems import MEDIA_TYPE as PROBLEM_JSON
from services.api.problems import TITLES, FieldError, Problem

PROBLEM_SYSTEM = "https://pumpwatch.dev/problems"


# --- responses and errors ------------------------------------------------------------------------


_PROBLEM = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/ProblemDocument"}}}
_TOO_LARGE: dict[str, Any] = {
    "description": "Request body too large (an RFC 9457 problem document)",
    "content": _PROBLEM,
}

_ISSUE_CODES = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    409: "conflict",
    413: "too-long",
    422: "invalid",
    429: "throttled",
}


def _issue(problem: Problem, error: FieldError | None = None) -> dict[str, Any]:
    issue: dict[str, Any] = {
        "severity": "error",
        "code": _ISSUE_CODES.get(problem.status, "exception"),
        "details": {
            "coding": [{"system": PROBLEM_SYSTEM, "code": problem.kind, "display": problem.title}],
            "text": problem.detail if error is None else f"{error.field}: {error.message}",
        },
    }
    if error is not None:
        issue["diagnostics"] = error.field
    return issue


def outcome(problem: Problem) -> FhirResponse:
    """The OperationOutcome of a problem: same status and headers, one issue per field error."""
    issues = [_issue(problem, error) for error in problem.errors or ()]
    body = {"resourceType": "OperationOutcome", "issue": issues or [_issue(problem)]}
    return FhirResponse(body, status_code=problem.status, headers=problem.headers)


# --- OpenAPI: schemas and examples for integrators -----------------------------------------------


class _Coding(BaseModel):
    system: str
    code: str
    display: str | None = None


class _Details(BaseModel):
    coding: list[_Coding]
    text: str


class _Issue(BaseModel):
    severity: Literal["fatal", "error", "warning", "information"]
    code: str = Field(description="FHIR IssueType: `not-found`, `invalid`, `login`, …")
    details: _Details = Field(description="The API's problem type (`coding`) and detail (`text`).")
    diagnostics: str | None = Field(
        default=None, description="The parameter a validation error is about (`query._count`)."
    )


class OperationOutcome(BaseModel):
    """A FHIR OperationOutcome: what the FHIR routes answer on an error."""

    resourceType: Literal["OperationOutcome"]
    issue: list[_Issue] = Field(min_length=1)


def _error(
    status: int, kind: str, detail: str, description: str, *, problem_too: bool = False
) -> dict[str, Any]:
    title = TITLES[kind]
    example = {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": _ISSUE_CODES[status],
                "details": {
                    "coding": [{"system": PROBLEM_SYSTEM, "code": kind, "display": title}],
                    "text": detail,
                },
            }
        ],
    }
    content: dict[str, Any] = {FHIR_JSON: {"example": example}}
    if problem_too:
        content |= _PROBLEM
    return {"model": OperationOutcome, "description": description, "content": content}


# Every status the app documents for all routes, as these routes answer it (an OperationOutcome;
# the 413 of the body limit comes from outside them, as a problem document).
ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error(
        400,
        "bad-cursor",
        "cursor is not one this API gave out",
        "Malformed request: a `_cursor` this API did not give out",
    ),
    401: _error(
        401,
        "unauthenticated",
        "send an API key: Authorization: Bearer <key>",
        "No key, or an unknown or revoked one",
    ),
    403: _error(
        403,
        "forbidden",
        "the fleet role cannot search by patient",
        "The key's role may not do this (the fleet role searching by patient)",
    ),
    404: _error(
        404,
        "not-found",
        "pump not found",
        "No such resource, or one of another clinic (a path that names no route at all, such "
        "as `/fhir/Device/` without a serial, is answered by the API as a problem document)",
        problem_too=True,
    ),
    409: _error(
        409,
        "conflict",
        "the resource changed meanwhile",
        "Conflicts with the current state (not answered by these read-only routes)",
    ),
    413: _TOO_LARGE,
    422: _error(
        422,
        "validation",
        "query._count: must be at most 500",
        "A parameter is malformed (`issue.diagnostics` names it)",
    ),
    429: _error(
        429,
        "rate-limited",
        "too many failed authentications from this source; retry in 31 s",
        "Too many failed authentications from this source",
    ),
}
