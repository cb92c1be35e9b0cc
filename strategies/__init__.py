"""Aggregation strategies: Flower's implementations, chosen and configured from YAML."""
