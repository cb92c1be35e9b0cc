"""The round engine: a run as a short loop over named stages (train, aggregate, validate, record,
checkpoint), with downlink compression, SecAgg+ and cross-site evaluation as optional stages."""
