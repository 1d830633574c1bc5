"""The stage engine: a worker's share of a model (a contiguous range of layers) with per-job KV caches."""
