"""The network: what travels between the core and the workers, and the worker node."""
