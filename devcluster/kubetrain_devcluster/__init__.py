"""The dev cluster: a Kubernetes API server, a local pod executor, moto S3 and the operator on one machine.

Tests and local use only; not part of the kubetrain distribution. See docs/dev-cluster.md.
"""
