"""Shared medical-imaging task code: data, transforms, models, training and metrics."""
