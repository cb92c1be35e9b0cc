"""Scoring a finished model at the hospitals: `aseanfl evaluate -f` and the region's contest."""
