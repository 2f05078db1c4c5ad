"""Federated algorithms: pure math first (hetlora.py), a thin Flower Strategy on top."""
