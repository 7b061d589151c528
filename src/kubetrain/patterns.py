"""Kubernetes' own name and quantity formats, as regular expressions: shared by the schema (api.py) and spec.pod
(pod_spec.py), which the schema imports."""

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
SIZE = r"^[1-9][0-9]{0,8}(Ki|Mi|Gi|Ti|k|M|G|T)?$"  # a byte quantity: "8Gi", "500M"
# any quantity, as the API server parses one: "4", "500m", "8Gi", "1.5", "1e3"
QUANTITY = r"^[+]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?[0-9]+))?$"
