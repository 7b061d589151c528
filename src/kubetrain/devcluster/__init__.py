"""The dev cluster: a Kubernetes API server and a local pod executor for tests and local runs."""
