"""Running the stages: executors (the only Ray code), the feature cache, the `select` job."""
