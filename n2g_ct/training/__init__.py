"""Training: configuration, data, the loop, run logs."""
