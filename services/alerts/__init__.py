"""The alert service: rules over each pump's data, the alert lifecycle, and the outbox."""
