"""Dashboards and alert rules as code (src/kubetrain/observability), checked against a real Prometheus.

Fast: the generated chart files are up to date; every panel has a PromQL target; every metric named in
a query exists in the trainer's or the operator's registry; the dashboards cover the issue's panels;
`promtool check rules` passes (alert rules, and the dashboards' queries as recording rules); MFU.

Slow (`@pytest.mark.slow`): Debian's prometheus scrapes a running 2-node trainer (`kubetrain run
--local`) and the real operator of a dev cluster. A job fails in the cluster (a restart, then Failed),
a reconcile hits an injected API error, and the trainer's checkpoint directory is made unwritable
mid-run: KubetrainJobFailed and KubetrainCheckpointFailing fire, and every dashboard query and every
alert signal returns data.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from kubetrain_testkit import polling
from kubetrain_testkit import tiny
from kubetrain.observability import JOB_LABEL, alerts, dashboards
from kubetrain.observability.__main__ import generated_files
from kubetrain.observability.__main__ import main as generate
from kubetrain_testkit.prometheus import PrometheusServer, ScrapeJob, promtool
from kubetrain_testkit import REPO

CHART = REPO / "charts" / "kubetrain"
RULES = CHART / alerts.RULE_FILE


@pytest.fixture(scope="session", autouse=True)
def prometheus_installed() -> None:
    """The test command installs what it needs: Debian's prometheus (prometheus, promtool)."""
    if not (shutil.which("prometheus") and shutil.which("promtool")):
        done = subprocess.run([str(REPO / "scripts" / "setup-system")], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"scripts/setup-system failed:\n{done.stdout}{done.stderr}"


def dashboard_docs() -> dict[str, dict]:
    return {rel: json.loads(text) for rel, text in generated_files().items() if rel.endswith(".json")}


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, PromQL) for every target of every dashboard."""
    return [(doc["uid"], title, expr) for doc in dashboard_docs().values() for title, expr in dashboards.panel_queries(doc)]


def variable_queries() -> list[str]:
    return [v["query"] for doc in dashboard_docs().values() for v in doc["templating"]["list"] if v["type"] == "query"]


def substitute(expr: str, namespace: str = ".*", job: str = ".*", rate: str = "5m", range_: str = "5m") -> str:
    """A dashboard query as Grafana sends it, with the variables' values filled in."""
    return (expr.replace("$__rate_interval", rate).replace("$__range", range_)
            .replace("$namespace", namespace).replace(f"${JOB_LABEL}", job))


# ------------------------------------------------------------------------------------------- generated

def test_generated_files_are_up_to_date():
    assert generate([str(CHART), "--check"]) == 0, "regenerate: python -m kubetrain.observability charts/kubetrain"


def test_check_fails_on_drift_and_on_stale_dashboards(tmp_path, capsys):
    assert generate([str(tmp_path), "--check"]) == 1
    assert "is missing" in capsys.readouterr().err
    assert generate([str(tmp_path)]) == 0
    assert generate([str(tmp_path), "--check"]) == 0
    (tmp_path / alerts.RULE_FILE).write_text("groups: []\n")
    (tmp_path / dashboards.DASHBOARD_DIR / "old.json").write_text("{}")
    assert generate([str(tmp_path), "--check"]) == 1
    err = capsys.readouterr().err
    assert "kubetrain-alerts.yaml is out of date" in err and "old.json is not generated" in err


# ------------------------------------------------------------------------------------------ structure

def test_every_dashboard_has_a_prometheus_datasource_variable_and_every_panel_a_target():
    for rel, doc in dashboard_docs().items():
        variables = {v["name"]: v for v in doc["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        panels = [p for p in doc["panels"] if p["type"] != "row"]
        assert panels, rel
        for p in panels:
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, (rel, p["title"])
            assert p["targets"] and all(t["expr"].strip() and t["refId"] for t in p["targets"]), (rel, p["title"])
        ids = [p["id"] for p in doc["panels"]]
        assert len(ids) == len(set(ids)), f"{rel}: panel ids repeat"
    training = dashboard_docs()[f"{dashboards.DASHBOARD_DIR}/kubetrain-training.json"]
    variables = {v["name"]: v for v in training["templating"]["list"]}
    assert {"namespace", JOB_LABEL} <= set(variables)
    for title, expr in dashboards.panel_queries(training):
        assert "$namespace" in expr and f"${JOB_LABEL}" in expr, f"{title}: not filtered by the job variables"


def test_dashboards_cover_the_issue():
    """Training progress, throughput, goodput, checkpoints, fleet: by panel and by metric."""
    want = {
        "kubetrain-training": {
            "Training loss": "kubetrain_train_loss", "Eval metrics": "kubetrain_eval_metric",
            "Step": "kubetrain_train_step", "ETA": "kubetrain_eta_seconds", "Progress": "kubetrain_train_total_steps",
            "Samples/s": "kubetrain_samples_per_second", "Real tokens/s": "kubetrain_tokens_per_second",
            "MFU": "kubetrain_mfu_ratio", "Goodput": "kubetrain_goodput_ratio",
            "Checkpoint duration": "kubetrain_last_checkpoint_duration_seconds",
            "Age of last checkpoint": "kubetrain_last_checkpoint_timestamp_seconds",
        },
        "kubetrain-fleet": {
            "Jobs by phase": "kubetrain_operator_jobs", "Group restarts by reason": "kubetrain_operator_restarts_total",
            "Preemptions over time": "kubetrain_operator_preemptions_total",
        },
    }
    found: dict[str, dict[str, str]] = {}
    for uid, title, expr in dashboard_queries():
        found.setdefault(uid, {}).setdefault(title, "")
        found[uid][title] += expr
    for uid, panels in want.items():
        for title, metric in panels.items():
            assert title in found[uid], f"{uid}: no panel {title!r}"
            assert metric in found[uid][title], f"{uid}/{title}: does not query {metric}"


def registry_names() -> set[str]:
    """Every series name the trainer and the operator can export (labelled metrics included)."""
    from kubetrain_operator.metrics import OperatorMetrics
    from kubetrain_trainer.metrics import TrainerMetrics

    names = set()
    for registry in (TrainerMetrics().registry, OperatorMetrics().registry):
        for family in registry.collect():
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}.get(family.type, ("",))
            names |= {family.name + s for s in suffixes}
    return names


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(kubetrain_[a-z0-9_]+)\b", re.sub(r'"[^"]*"', '""', expr)))


def test_every_metric_in_a_query_exists_in_the_trainer_or_operator_registry():
    known = registry_names()
    exprs = [e for _, _, e in dashboard_queries()] + variable_queries() + [r.expr for r in alerts.ALERTS]
    used = set().union(*map(metric_names, exprs))
    assert used - known == set(), f"unknown metrics: {sorted(used - known)}"
    # and nothing else: every identifier that looks like a series name is one of ours
    for expr in exprs:
        for word in re.findall(r"\b([a-z_]+_(?:total|seconds|bucket|count|sum|ratio))\b", re.sub(r'"[^"]*"', '""', expr)):
            assert word.startswith("kubetrain_"), f"{word} in {expr}"


def test_alert_rules_are_complete_and_cover_the_issue():
    names = {r.name for r in alerts.ALERTS}
    assert {"KubetrainJobFailed", "KubetrainJobStalled", "KubetrainCheckpointFailing", "KubetrainHighRestartRate"} <= names
    assert len(names) == len(alerts.ALERTS)
    doc = yaml.safe_load(RULES.read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert [r["alert"] for r in rules] == [r.name for r in sorted(alerts.ALERTS, key=lambda a: a.group != "operator")]
    for rule in alerts.ALERTS:
        assert rule.severity in {"critical", "warning", "info"}
        assert rule.expr.startswith(f"({rule.signal}) "), "the signal is queryable on its own"
        if rule.group == "trainer":  # per job: the description names it
            assert "$labels.namespace" in rule.description and f"$labels.{JOB_LABEL}" in rule.description
    stalled = next(r for r in alerts.ALERTS if r.name == "KubetrainJobStalled")
    assert "kubetrain_train_step" in stalled.signal and stalled.for_ != "0m"


def test_promtool_check_rules_passes():
    out = promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alerts.ALERTS)} rules found" in out.stdout


def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses each query (variables filled in) as a recording rule."""
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"kubetrain:dashboard_query_{i}", "expr": substitute(expr)}
        for i, (_, _, expr) in enumerate(dashboard_queries())]}]}
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(rules))
    out = promtool("check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------- MFU

def test_model_flops_per_token_counts_matmul_weights_six_n_and_about_four_n_with_lora():
    import peft
    import transformers

    from kubetrain_trainer.step_log import model_flops_per_token

    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=300, num_labels=2, **{k: v for k, v in tiny.TINY_BERT.items() if k != "model_type"}))
    lookups = sum(m.weight.numel() for m in bert.modules() if isinstance(m, torch.nn.Embedding))
    n = sum(p.numel() for p in bert.parameters()) - lookups
    assert model_flops_per_token(bert) == 6 * n

    gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=300, **{k: v for k, v in tiny.TINY_GPT2.items() if k != "model_type"}))
    positions = gpt.transformer.wpe.weight.numel()  # a lookup; the tied token embedding is also the LM head
    n = sum(p.numel() for p in gpt.parameters()) - positions
    assert model_flops_per_token(gpt) == 6 * n
    lora = peft.get_peft_model(gpt, peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert model_flops_per_token(lora) == 4 * (n + trainable) + 2 * trainable


def test_peak_flops_knows_a100_h100_h200_and_nothing_else(monkeypatch):
    from kubetrain_trainer import step_log

    cuda = torch.device("cuda", 0)
    cases = {"NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA H100 80GB HBM3": 989.5e12, "NVIDIA H100 PCIe": 756.5e12,
             "NVIDIA H100 NVL": 835.5e12, "NVIDIA H200": 989.5e12, "NVIDIA H200 NVL": 835.5e12,
             "Tesla T4": None, "NVIDIA GeForce RTX 4090": None}
    monkeypatch.delenv(step_log.PEAK_TFLOPS_ENV, raising=False)
    for name, peak in cases.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda _d, name=name: name)
        assert step_log.peak_flops(cuda) == ((name, peak) if peak else None), name
    assert step_log.peak_flops(torch.device("cpu")) is None
    monkeypatch.setenv(step_log.PEAK_TFLOPS_ENV, "2.5")
    assert step_log.peak_flops(torch.device("cpu")) == ("cpu", 2.5e12)


@pytest.mark.parametrize("peak", [None, "0.5"])
def test_progress_sets_model_flops_and_mfu_only_where_the_peak_is_known(peak, monkeypatch):
    from kubetrain_trainer import step_log
    from kubetrain_trainer.checkpoint_state import TrainState
    from kubetrain_trainer.data import StepBatches
    from kubetrain_trainer.distributed import Runtime
    from kubetrain_trainer.metrics import TrainerMetrics

    if peak:
        monkeypatch.setenv(step_log.PEAK_TFLOPS_ENV, peak)
    else:
        monkeypatch.delenv(step_log.PEAK_TFLOPS_ENV, raising=False)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3))  # 15 matmul parameters
    metrics = TrainerMetrics()
    log = step_log.StepLog(Runtime(0, 0, 2, torch.device("cpu")), metrics, total_steps=10, state=TrainState(),
                               model=model)
    batches = StepBatches([[0]], global_samples=4, global_tokens=1000, global_targets=4, global_padded=1200)
    log.record(batches, torch.tensor(2.0), torch.tensor(1.0), 0.1)
    log.flush(epoch=0.0)
    tokens_s = metrics.registry.get_sample_value("kubetrain_tokens_per_second")
    flops = metrics.registry.get_sample_value("kubetrain_model_flops_per_second")
    assert flops == pytest.approx(6 * 15 * tokens_s)
    mfu = metrics.registry.get_sample_value("kubetrain_mfu_ratio", {"device": "cpu"})
    assert mfu == (pytest.approx(flops / (0.5e12 * 2)) if peak else None)


# ---------------------------------------------------------------------------- Prometheus, for real

NS = "tests"
TRAINER_JOB = "obs-train"
FAILING_JOB = "obs-fails"


class Trainer:
    """`kubetrain run --local` of a long tiny job, niced, in its own session (stopped as a group)."""

    def __init__(self, job: Path, work_dir: Path, port: int, log_path: Path, env: dict[str, str]):
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kubetrain.cli", "run", "--local", str(job), "--work-dir", str(work_dir),
                 "--metrics-port", str(port)],
                env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=lambda: os.nice(10))

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # forwarded to every node: emergency checkpoint, exit 75
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left of the group
        except ProcessLookupError:
            pass
        self.proc.wait()


class BrokenDirectory:
    """Replace a directory with a plain file, so nothing can be written under it (even as root)."""

    def __init__(self, path: Path):
        self.path, self.moved = path, path.with_name(path.name + ".moved")

    def __enter__(self) -> BrokenDirectory:
        blocker = self.path.with_name(self.path.name + ".blocker")
        blocker.write_text("not a directory\n")
        for _ in range(50):  # a save may recreate the directory between the two renames
            if self.path.is_dir():
                shutil.rmtree(self.moved, ignore_errors=True)
                os.rename(self.path, self.moved)
            try:
                os.rename(blocker, self.path)
                return self
            except IsADirectoryError:
                continue
        raise AssertionError(f"could not replace {self.path}")

    def __exit__(self, *exc: object) -> None:
        if self.path.is_file():
            self.path.unlink()
        if self.moved.is_dir() and not self.path.exists():
            os.rename(self.moved, self.path)


@dataclass
class Stack:
    prom: PrometheusServer
    cluster: object
    trainer: Trainer

    def diagnostics(self) -> str:
        tail = lambda text: text[-3000:]  # noqa: E731
        cluster_logs = "\n".join(f"--- {n}\n{tail((self.cluster.logs / n).read_text(errors='replace'))}"
                                 for n in ("operator.log", "executor.log") if (self.cluster.logs / n).exists())
        return (f"--- trainer\n{tail(self.trainer.output())}\n{cluster_logs}\n--- prometheus\n{tail(self.prom.log())}\n"
                f"--- targets\n{[(t['labels'].get('job'), t['health'], t['lastError']) for t in self.prom.targets()]}")


def firing(prom: PrometheusServer, name: str) -> list[dict]:
    return [a for a in prom.alerts() if a["labels"]["alertname"] == name and a["state"] == "firing"]


def wait_for(what: str, probe, timeout: float, stack: Stack | None = None):
    return polling.wait_for(what, probe, timeout, stack.diagnostics if stack else lambda: "", interval=0.5)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from kubetrain_devcluster.cluster import DevCluster
    from kubetrain.ports import free_port

    work = tmp_path_factory.mktemp("observability")
    train, evals = tiny.write_corpus(work, n_train=200, n_eval=40)
    tokenizer = tiny.train_tokenizer(work / "tokenizer", train)
    checkpoints = work / "checkpoints"
    doc = tiny.job_doc(TRAINER_JOB, train, evals, tokenizer, str(checkpoints), nodes=2,
                       training__maxSteps=100_000, training__epochs=10_000, training__evalEverySteps=20,
                       checkpoint__everySteps=60, checkpoint__keep=2, checkpoint__uploadAttempts=2)
    doc["metadata"]["namespace"] = NS
    job = tiny.write_job(work / "train.yaml", doc)
    port = free_port()

    with DevCluster(work / "cluster", nodes=1) as cluster:
        trainer = Trainer(job, work / "trainer", port, work / "trainer.log", env={"KUBETRAIN_PEAK_TFLOPS": "1"})
        prom = PrometheusServer(work / "prometheus", [
            # the labels a PodMonitor adds to rank 0 of a job (see kubetrain.observability)
            ScrapeJob("kubetrain-trainer", [f"127.0.0.1:{port}"],
                      {"namespace": NS, JOB_LABEL: TRAINER_JOB, "pod": f"{TRAINER_JOB}-0"}),
            ScrapeJob("kubetrain-operator", [f"127.0.0.1:{cluster.operator_metrics_port}"],
                      {"namespace": "kubetrain-system", "pod": "kubetrain-operator"}),
        ], rule_files=[RULES])
        try:
            prom.start()
            s = Stack(prom, cluster, trainer)
            # increase() counts only what comes after a series' first sample: the operator's restart counter
            # must be scraped at 0 before the failing job below restarts, or its restart does not show
            wait_for("the operator scraped", lambda: prom.query("kubetrain_operator_restarts_total"), 60, s)
            # a job that fails in the cluster with a transient error (its S3 endpoint refuses connections), backoffLimit
            # 1: one restart, then Failed; its first status write hits an injected API error (a reconcile error)
            cluster.api_faults("POST", {"status": 500, "methods": ["PATCH"], "pathRegex": f"trainingjobs/{FAILING_JOB}/status"})
            failing = tiny.job_doc(FAILING_JOB, train, None, tokenizer, "s3://nowhere/ckpt", runPolicy={"backoffLimit": 1},
                                   checkpoint__endpoint=f"http://127.0.0.1:{free_port()}", checkpoint__s3Secret="s3-creds")
            failing["metadata"]["namespace"] = cluster.namespace
            cluster.custom_api().create_namespaced_custom_object("kubetrain.io", "v1alpha1", cluster.namespace,
                                                                 "trainingjobs", failing)
            # the trainer trains, evaluates and checkpoints; then its checkpoint directory breaks
            wait_for("two checkpoints and an eval", lambda: (
                prom.query(f'kubetrain_last_checkpoint_step{{{JOB_LABEL}="{TRAINER_JOB}"}} >= 120')
                and prom.query("kubetrain_eval_metric")), timeout=150, stack=s)
            # A labelled counter appears at 1, and rate() sees only what comes after a series' first sample:
            # once the first error is scraped, a second one (the operator's next read of the job).
            wait_for("a reconcile error scraped", lambda: prom.query("kubetrain_operator_reconcile_errors_total"), 60, s)
            cluster.api_faults("POST", {"status": 500, "methods": ["GET"], "pathRegex": f"trainingjobs/{FAILING_JOB}$"})
            with BrokenDirectory(checkpoints / NS):
                yield s
        finally:
            trainer.stop()
            prom.stop()


@pytest.mark.slow
def test_prometheus_scrapes_the_trainer_and_the_operator(stack):
    up = {r["metric"]["job"]: r["value"][1] for r in stack.prom.query("up")}
    assert up == {"kubetrain-trainer": "1", "kubetrain-operator": "1"}, stack.diagnostics()
    world = stack.prom.query(f'kubetrain_world_size{{namespace="{NS}", {JOB_LABEL}="{TRAINER_JOB}"}}')
    assert [r["value"][1] for r in world] == ["2"]
    rules = stack.prom.rules()
    assert {r["name"] for r in rules} == {a.name for a in alerts.ALERTS}
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]


@pytest.mark.slow
def test_job_failed_checkpoint_storage_errors_and_checkpoint_failing_alerts_fire(stack):
    prom = stack.prom
    failed = wait_for("KubetrainJobFailed firing", lambda: firing(prom, "KubetrainJobFailed"), 150, stack)
    assert failed[0]["labels"]["severity"] == "critical"
    assert "entered phase Failed" in failed[0]["annotations"]["description"]
    wait_for("the injected faults to be used up", lambda: not stack.cluster.api_faults()["faults"], 30, stack)
    status = stack.cluster.custom_api().get_namespaced_custom_object(
        "kubetrain.io", "v1alpha1", stack.cluster.namespace, "trainingjobs", FAILING_JOB)["status"]
    assert status["phase"] == "Failed" and status["restarts"] == 1, status

    retried = wait_for("KubetrainCheckpointStorageErrors firing", lambda: firing(prom, "KubetrainCheckpointStorageErrors"),
                       90, stack)
    assert retried[0]["labels"]["pod"] == f"{TRAINER_JOB}-0" and "being retried" in retried[0]["annotations"]["description"]
    ckpt = wait_for("KubetrainCheckpointFailing firing", lambda: firing(prom, "KubetrainCheckpointFailing"), 90, stack)
    labels = ckpt[0]["labels"]
    assert (labels["namespace"], labels[JOB_LABEL], labels["pod"]) == (NS, TRAINER_JOB, f"{TRAINER_JOB}-0")
    assert f"{NS}/{TRAINER_JOB}" in ckpt[0]["annotations"]["summary"]
    assert "checkpoint failed" in stack.trainer.output()
    # a job that trains is not stalled: the stall alert is not even pending
    assert not [a for a in prom.alerts() if a["labels"]["alertname"] == "KubetrainJobStalled"]


@pytest.mark.slow
def test_every_dashboard_query_and_alert_signal_returns_data(stack):
    prom = stack.prom
    queries = {f"{uid} / {title}: {expr}": substitute(expr, namespace=NS, job=TRAINER_JOB)
               for uid, title, expr in dashboard_queries()}
    queries |= {f"alert {r.name}: {r.signal}": r.signal for r in alerts.ALERTS}
    # What happened must show in the signals, not only as zeros: a failed job, a failure restart, failed
    # checkpoints, reconcile errors (each after its own event, so allow the scrapes to catch up).
    signals = {r.name: r.signal for r in alerts.ALERTS}
    nonzero = {f"alert {name}: {signals[name]}" for name in ("KubetrainJobFailed", "KubetrainCheckpointFailing",
                                                              "KubetrainHighRestartRate", "KubetrainOperatorReconcileErrors")}
    nonzero |= {what for what in queries if "/ Reconcile errors:" in what or "/ Checkpoint failures:" in what}
    deadline = time.monotonic() + 90
    while True:
        bad = {}
        for what, expr in queries.items():
            result = prom.query(expr)
            values = [float(r["value"][1]) for r in result]
            if not values or not all(math.isfinite(v) for v in values) or (what in nonzero and max(values) <= 0):
                bad[what] = result
        if not bad or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not bad, "queries without data, with NaN, or 0 where something happened:\n" + \
        "\n".join(f"{k}\n  -> {v}" for k, v in bad.items()) + f"\n{stack.diagnostics()}"
    for expr in variable_queries():  # label_values(SELECTOR, LABEL): the selector has series carrying LABEL
        selector, label = re.fullmatch(r"label_values\((.*), (\w+)\)", expr).groups()
        series = prom.api("series", **{"match[]": substitute(selector, namespace=NS)})
        assert any(label in s for s in series), expr
    restarts = prom.query('kubetrain_operator_restarts_total{reason="failure"}')
    errors = prom.query("kubetrain_operator_reconcile_errors_total")
    raised = {e["metric"]["kind"] for e in errors if float(e["value"][1]) > 0}
    assert restarts[0]["value"][1] == "1" and raised == {"api"}, (restarts, errors)
