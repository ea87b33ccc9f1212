"""Clinic notifications: the outbox fanned out into deliveries (webhooks, email, MQTT) by each
clinic's routing, delivered at least once with retries, escalation of unacknowledged high
alerts, and the daily refill digest. Runs on a thread of ``pumpwatch alerts``, or alone as
``pumpwatch notify`` (``runner``, ``service``)."""
