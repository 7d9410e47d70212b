"""Environments: the cache of locked environments, how they are built (venv or conda), interpreters."""
