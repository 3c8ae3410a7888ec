"""Thin async Kubernetes API layer."""
