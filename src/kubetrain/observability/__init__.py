"""Grafana dashboards and Prometheus alert rules for kubetrain, as code.

`python -m kubetrain.observability charts/kubetrain` writes the generated files the Helm chart ships:
`dashboards/<name>.json` (built with grafana-foundation-sdk, `dashboards.py`) and
`rules/kubetrain-alerts.yaml` (the `groups:` of a PrometheusRule spec, also a Prometheus rule file,
`alerts.py`); `--check` fails on drift.

Label contract. The trainer's metrics carry no job identity; the scrape adds it:
- trainer series (rank 0 of each job, pod `<job>-0`, container port `metrics`) carry the target labels
  `namespace`, `pod` and `trainingjob` (the TrainingJob's name). With the Prometheus operator this is a
  PodMonitor selecting pods with `kubetrain.io/node-rank: "0"` that relabels the pod label
  `kubetrain.io/job-name` (`__meta_kubernetes_pod_label_kubetrain_io_job_name`) to `trainingjob`
  (`namespace` and `pod` come by default);
- operator series (`kubetrain_operator_*`) are fleet-wide: no per-job labels.
"""

from __future__ import annotations

JOB_LABEL = "trainingjob"  # the TrainingJob's name on trainer series (see the module docstring)
TRAINER_LABELS = ("namespace", JOB_LABEL, "pod")
