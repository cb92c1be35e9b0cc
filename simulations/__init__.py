"""Researcher side: a whole federation of simulated hospitals on one machine or a Ray cluster."""
