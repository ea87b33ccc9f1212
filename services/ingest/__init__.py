"""The ingest service: MQTT telemetry and events into PostgreSQL, exactly once."""
