"""Coordinator side: the Flower ServerApp that runs rounds and records results."""
