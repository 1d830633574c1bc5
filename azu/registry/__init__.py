"""The registry: model sources, the sharder, manifests, shard status, downloads."""
