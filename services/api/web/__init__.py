"""The clinic web dashboard, served by ``pumpwatch api``: server-rendered pages over the same
functions as the JSON API (tenancy, audit and forecasts included), no third-party assets."""
