"""Prefect tasks: one thin wrapper per library step, adding caching, retries and results."""
