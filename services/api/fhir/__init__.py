"""FHIR R4 for integrators: ``resources`` maps our rows to FHIR resources (with the examples the
OpenAPI document shows), ``search`` parses the search parameters and pages, ``errors`` answers
failures as ``OperationOutcome``, ``routes`` holds the router and its handlers."""
