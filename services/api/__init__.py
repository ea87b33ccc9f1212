"""``pumpwatch api``: the HTTP API for clinics, integrators and device teams (FastAPI)."""
