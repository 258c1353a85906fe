"""Workers: consume a model's jobs stream, run jobs on an engine, publish token deltas."""
