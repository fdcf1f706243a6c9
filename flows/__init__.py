"""Prefect flows: which tasks run, in which order, with which inputs."""
