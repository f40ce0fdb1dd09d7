"""sdrt benchmarks: latency per component, per step and end to end, per device (issue #6)."""
