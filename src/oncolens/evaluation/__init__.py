"""Measuring models: dataset manifests, classification metrics, ``oncolens evaluate``."""
