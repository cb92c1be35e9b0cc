"""What a run leaves in its folder: metrics rows, models, the digest and words of the live table,
report.md with its plots, and the copies sent to TensorBoard or MLflow."""
