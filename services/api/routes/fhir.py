"""FHIR R4 read endpoints for integrators (Device, Observation, Flag)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/fhir", tags=["fhir"])
