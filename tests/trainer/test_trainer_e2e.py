"""End to end: `kubetrain run --local` as real torchrun processes (gloo), checkpoints in a real moto S3.

Covers the core promises: a 2-node run reaches its steps and checkpoints to S3 while serving sane
/metrics; SIGTERM mid-run saves an emergency checkpoint, exits 75, and the restart resumes there with
0 steps lost and final weights bitwise equal to an uninterrupted run; a torn checkpoint is ignored;
an invalid spec fails fast, naming the field, writing nothing.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from kubetrain_devcluster.s3 import S3Server

from kubetrain_testkit import tiny
from kubetrain_testkit.prometheus import scrape
from kubetrain.api import EXIT_PERMANENT, JOB_UID_ENV, load_training_job
from kubetrain.local import node_commands
from kubetrain.termination import TERMINATION_MESSAGE_ENV, decode_report
from kubetrain.ports import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("corpus")
    train, evals = tiny.write_corpus(out)
    return {"train": train, "eval": evals, "tokenizer": tiny.train_tokenizer(out / "tokenizer", train)}


def make_job(tmp_path: Path, corpus: dict, name: str, checkpoint_uri: str, **overrides) -> Path:
    doc = tiny.job_doc(name, corpus["train"], corpus["eval"], corpus["tokenizer"], checkpoint_uri, **overrides)
    return tiny.write_job(tmp_path / f"{name}.yaml", doc)


def manifests(s3: S3Server, bucket: str, prefix: str) -> dict[int, dict]:
    """Complete checkpoints under prefix: step -> manifest."""
    client = s3.client()
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]
    found = {}
    for key in keys:
        if key.endswith("/manifest.json"):
            manifest = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
            found[manifest["step"]] = manifest
    return found


def load_model_state(s3: S3Server, bucket: str, prefix: str, step: int, tmp_path: Path) -> dict[str, torch.Tensor]:
    target = tmp_path / f"{prefix.replace('/', '_')}-{step}.pt"
    s3.client().download_file(bucket, f"{prefix}/step-{step:09d}/model.pt", str(target))
    return torch.load(target, weights_only=True)


def test_two_node_run_checkpoints_to_s3_and_serves_metrics(corpus, s3_server, s3_bucket, tmp_path):
    client = s3_server.client()
    for split in ("train", "eval"):  # data read from s3:// too
        client.upload_file(str(corpus[split]), s3_bucket, f"data/{split}.jsonl")
    job = make_job(tmp_path, corpus, "two-node", f"s3://{s3_bucket}/ckpt", nodes=2,
                   data__train=f"s3://{s3_bucket}/data/train.jsonl", data__eval=f"s3://{s3_bucket}/data/eval.jsonl",
                   training__maxSteps=60, training__evalEverySteps=10, training__logEverySteps=5,
                   training__gradientAccumulation=2,  # DDP no_sync on all but the last micro-batch
                   checkpoint__everySteps=10, checkpoint__keep=2, metrics__lingerSeconds=4)
    port = free_port()
    run = tiny.LocalRun(job, env={**s3_server.env(), "KUBETRAIN_METRICS_ADDR": "127.0.0.1"}, work_dir=tmp_path / "work",
                        metrics_port=port)
    run.wait_for(r"finished at step 60")
    final = scrape(f"http://127.0.0.1:{port}/metrics")  # served for lingerSeconds after the last step
    assert run.finish() == 0, run.output

    # S3: keep=2 newest complete checkpoints, the final one among them, files as the manifest says
    found = manifests(s3_server, s3_bucket, "ckpt/tests/two-node/")
    assert sorted(found) == [50, 60]
    assert found[60]["meta"]["reason"] == "final" and found[60]["meta"]["world_size"] == 2
    assert found[60]["meta"]["state"]["step"] == 60
    head = s3_server.client().head_object(Bucket=s3_bucket, Key="ckpt/tests/two-node/step-000000060/model.pt")
    assert head["ContentLength"] == found[60]["files"]["model.pt"]["size"] > 10_000

    # /metrics over HTTP: the metrics, with sane values
    assert final["kubetrain_train_step"] == 60
    assert final["kubetrain_train_total_steps"] == 60
    assert final["kubetrain_world_size"] == 2
    assert 0 < final["kubetrain_train_loss"] < 5 and math.isfinite(final["kubetrain_train_loss"])
    assert 0 <= final["kubetrain_learning_rate"] <= 1e-3
    assert 0 < final["kubetrain_grad_norm"] < 1e3
    assert final["kubetrain_samples_per_second"] > 0
    assert final["kubetrain_tokens_per_second"] > 5 * final["kubetrain_samples_per_second"]  # >5 real tokens/sample
    assert final["kubetrain_train_tokens_total"] > final["kubetrain_train_samples_total"] > 0
    assert 0 <= final["kubetrain_padding_ratio"] < 0.5  # length-aware batching keeps padding low
    assert 0 < final["kubetrain_goodput_ratio"] <= 1
    assert final["kubetrain_eta_seconds"] >= 0
    for name in ("eval_accuracy", "eval_precision", "eval_recall", "eval_f1"):
        assert 0 <= final[f"kubetrain_eval_metric{{metric={name}}}"] <= 1
    assert final["kubetrain_eval_metric{metric=eval_loss}"] > 0
    assert final["kubetrain_last_checkpoint_step"] == 60
    assert final["kubetrain_checkpoint_bytes"] == sum(f["size"] for f in found[60]["files"].values())
    assert final["kubetrain_checkpoints_total{reason=periodic}"] == 5
    assert final["kubetrain_checkpoints_total{reason=final}"] == 1
    assert final["kubetrain_checkpoint_duration_seconds_count{phase=upload}"] == 6
    assert final["kubetrain_checkpoint_duration_seconds_sum{phase=stall}"] > 0
    assert 0 < final["kubetrain_last_checkpoint_duration_seconds{phase=upload}"] <= final[
        "kubetrain_checkpoint_duration_seconds_sum{phase=upload}"]
    assert final["kubetrain_last_checkpoint_timestamp_seconds"] > time.time() - 600


def uninterrupted(tmp_path: Path, corpus: dict, bucket: str, env: dict, **common) -> tiny.LocalRun:
    """The reference: the same job, straight through, under the name `straight`."""
    straight = tiny.LocalRun(make_job(tmp_path, corpus, "straight", f"s3://{bucket}/ckpt", **common), env=env,
                             work_dir=tmp_path / "w1")
    assert straight.finish() == 0, straight.output
    return straight


def assert_final_weights_equal(s3: S3Server, bucket: str, name: str, step: int, tmp_path: Path) -> None:
    a = load_model_state(s3, bucket, "ckpt/tests/straight", step, tmp_path)
    b = load_model_state(s3, bucket, f"ckpt/tests/{name}", step, tmp_path)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ after resume: {different[:5]}"


def test_sigterm_resumes_exactly_with_no_step_lost(corpus, s3_server, s3_bucket, tmp_path):
    """Preempted + resumed == uninterrupted, bitwise, in deterministic CPU mode."""
    common = dict(nodes=2, training__maxSteps=120, training__deterministic=True, checkpoint__everySteps=25,
                  checkpoint__keep=20, training__evalEverySteps=40)
    env = s3_server.env()
    straight = uninterrupted(tmp_path, corpus, s3_bucket, env, **common)

    job = make_job(tmp_path, corpus, "preempted", f"s3://{s3_bucket}/ckpt", **common)
    first = tiny.LocalRun(job, env=env, work_dir=tmp_path / "w2")
    first.wait_for(r"step 30/120")
    first.proc.send_signal(signal.SIGTERM)  # what Kubernetes sends to the pod's PID 1
    assert first.finish() == 75, first.output
    stopped_at = int(first.wait_for(r"emergency checkpoint at step (\d+) saved").group(1))
    last_trained = max(int(m.group(1)) for m in first.matches(r"step (\d+)/120"))
    assert 30 <= stopped_at < 120
    assert last_trained == stopped_at  # every step trained before the signal is in the checkpoint
    emergency = manifests(s3_server, s3_bucket, "ckpt/tests/preempted/")[stopped_at]
    assert emergency["meta"]["reason"] in ("preemption", "periodic")  # periodic if SIGTERM hit a save step

    second = tiny.LocalRun(job, env=env, work_dir=tmp_path / "w3")
    assert second.finish() == 0, second.output
    resumed_at = int(second.wait_for(r"resumed from \S+ at step (\d+)").group(1))
    assert resumed_at == stopped_at  # 0 steps lost
    first_after = min(int(m.group(1)) for m in second.matches(r"step (\d+)/120 "))
    assert first_after == stopped_at + 1  # and none trained twice

    # same data order: identical per-step losses after the resume point
    def losses(run):
        return {int(m.group(1)): m.group(2) for m in run.matches(r"step (\d+)/120 .*\| loss (\S+)")}

    after = {s: v for s, v in losses(second).items() if s > stopped_at}
    assert after and after == {s: v for s, v in losses(straight).items() if s > stopped_at}

    assert_final_weights_equal(s3_server, s3_bucket, "preempted", 120, tmp_path)  # exact resume: bitwise equal


def test_torn_checkpoint_is_ignored_on_resume(corpus, s3_server, s3_bucket, tmp_path):
    job_args = dict(training__maxSteps=12, checkpoint__everySteps=4)
    env = s3_server.env()
    job = make_job(tmp_path, corpus, "torn", f"s3://{s3_bucket}/ckpt", **job_args)
    assert tiny.LocalRun(job, env=env, work_dir=tmp_path / "w").finish() == 0

    # an upload cut before its manifest: step 16's files are all there, its manifest is not
    client = s3_server.client()
    for name in ("model.pt", "optimizer.pt", "training.pt", "state.json"):
        client.copy_object(Bucket=s3_bucket, CopySource={"Bucket": s3_bucket, "Key": f"ckpt/tests/torn/step-000000012/{name}"},
                           Key=f"ckpt/tests/torn/step-000000016/{name}")

    job = make_job(tmp_path, corpus, "torn", f"s3://{s3_bucket}/ckpt", **{**job_args, "training__maxSteps": 20})
    rerun = tiny.LocalRun(job, env=env, work_dir=tmp_path / "w")
    assert rerun.finish() == 0, rerun.output
    assert rerun.wait_for(r"resumed from \S+ at step (\d+)").group(1) == "12"
    found = manifests(s3_server, s3_bucket, "ckpt/tests/torn/")
    assert 16 in found and found[16]["meta"]["state"]["step"] == 16  # step 16 redone for real, not the torn copy
    assert max(found) == 20


BAD_SPECS = {
    "nodes 0": ({"nodes": 0}, "spec.nodes"),
    "unknown task": ({"model": {"config": {"model_type": "bert"}, "tokenizer": "t", "task": "translation"}}, "spec.model.task"),
    "wrong type": ({"training": {"maxSteps": "many"}}, "spec.training.maxSteps"),
    "missing image": ({"image": None}, "spec.image"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_invalid_spec_fails_naming_the_field_and_writes_nothing(case, corpus, tmp_path):
    change, field = BAD_SPECS[case]
    doc = tiny.job_doc("bad", corpus["train"], corpus["eval"], corpus["tokenizer"], str(tmp_path / "ckpt"))
    for key, value in change.items():
        if value is None:
            del doc["spec"][key]
        else:
            doc["spec"][key] = value
    job = tiny.write_job(tmp_path / "bad.yaml", doc)
    for cmd in ([sys.executable, "-m", "kubetrain.cli", "run", "--local", str(job), "--work-dir", str(tmp_path / "work")],
                [sys.executable, "-m", "kubetrain_trainer", "--config", str(job), "--work-dir", str(tmp_path / "work")]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert f"{field}:" in done.stderr, done.stderr
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "work").exists()


def test_not_yaml_is_rejected(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("spec: [unclosed\n")
    done = subprocess.run([sys.executable, "-m", "kubetrain.cli", "run", "--local", str(job)], capture_output=True, text=True)
    assert done.returncode == 2 and "not valid YAML" in done.stderr


def test_bad_data_row_is_named(corpus, tmp_path):
    rows = corpus["train"].read_text().splitlines()
    broken = tmp_path / "train.jsonl"
    broken.write_text("\n".join(rows[:5] + ['{"text": "no label here"}'] + rows[5:]) + "\n")
    doc = tiny.job_doc("bad-data", broken, None, corpus["tokenizer"], str(tmp_path / "ckpt"))
    run = tiny.LocalRun(tiny.write_job(tmp_path / "job.yaml", doc), env={}, work_dir=tmp_path / "work")
    assert run.finish() == EXIT_PERMANENT  # no retry can fix it
    assert f"launch: data error: {broken} row 6: missing field 'label' (spec.data.labelField) (exit 65)" in run.output
    assert not (tmp_path / "ckpt").exists()


def test_a_missing_data_file_is_named_before_any_process_starts(corpus, tmp_path):
    doc = tiny.job_doc("typo", Path("data/trian.jsonl"), None, corpus["tokenizer"], str(tmp_path / "ckpt"))
    job = tiny.write_job(tmp_path / "job.yaml", doc)
    for command in ("validate", "run"):
        done = subprocess.run([sys.executable, "-m", "kubetrain.cli", command, *(["--local"] if command == "run" else []),
                               str(job)], capture_output=True, text=True, timeout=60)
        assert done.returncode == EXIT_PERMANENT, done.stderr
        assert done.stderr == (f"{job}: spec.data.train: data/trian.jsonl: no such file or directory "
                               f"(relative paths resolve against {tmp_path})\n")


def test_a_diverging_run_fails_naming_the_step_and_every_node_reports_the_last_good_checkpoint(corpus, tmp_path):
    """fp16 at learning rate 10 overflows within a few steps (real NaN, no injection). All ranks find it at once,
    and the operator may see any pod's report first (it deletes the others when it fails the job): each node's
    report must name the newest checkpoint, not only rank 0's."""
    doc = tiny.job_doc("diverge2", corpus["train"], None, corpus["tokenizer"], str(tmp_path / "ckpt"), nodes=2,
                       training__precision="fp16", training__learningRate=10, training__warmupRatio=0,
                       training__maxSteps=40, training__logEverySteps=5, checkpoint__everySteps=1)
    path = tiny.write_job(tmp_path / "job.yaml", doc)
    commands = node_commands(load_training_job(str(path)), path, ["--work-dir", str(tmp_path / "work")], free_port(),
                             f"diverge2-{os.getpid()}")
    reports = [tmp_path / f"termination-{node}" for node in range(2)]
    env = {**os.environ, JOB_UID_ENV: "uid-diverge2", "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(cmd, env={**env, TERMINATION_MESSAGE_ENV: str(report)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for cmd, report in zip(commands, reports)]
    outputs = [node.communicate(timeout=300)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [EXIT_PERMANENT] * 2, [out[-3000:] for out in outputs]
    bad = int(re.search(r"launch: diverged: non-finite loss at step (\d+) \(training.onNonFinite: fail\)", outputs[0])[1])
    steps = sorted(int(p.name.removeprefix("step-")) for p in (tmp_path / "ckpt/tests/diverge2").glob("step-*")
                   if (p / "manifest.json").exists())
    assert steps and max(steps) < bad, (steps, bad)  # no checkpoint at or after the first bad step
    newest = torch.load(tmp_path / f"ckpt/tests/diverge2/step-{max(steps):09d}/model.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in newest.values())
    said = [decode_report(report.read_text()) for report in reports]
    assert [(r.outcome, r.reason, r.checkpoint_step) for r in said] == [("failed", "Diverged", max(steps))] * 2, said
    assert said[0].checkpoint_uri == said[1].checkpoint_uri and said[0].checkpoint_uri.endswith(f"step-{max(steps):09d}")


def test_node_k_holds_global_rank_k_whichever_node_starts_first(corpus, tmp_path):
    """The operator reads rank 0's report, metrics and progress from pod 0. torchrun's c10d rendezvous numbered
    nodes by (address, pid): with equal addresses (the dev cluster, or nodes behind one name) the first process
    took rank 0, wherever it ran. Node 1 starts first here."""
    doc = tiny.job_doc("ranks", corpus["train"], None, corpus["tokenizer"], str(tmp_path / "ckpt"), nodes=2,
                       training__maxSteps=2, checkpoint__everySteps=100)
    path = tiny.write_job(tmp_path / "job.yaml", doc)
    commands = node_commands(load_training_job(str(path)), path, ["--work-dir", str(tmp_path / "work")], free_port(),
                             f"ranks-{os.getpid()}")
    env = {**os.environ, JOB_UID_ENV: "uid-ranks", "OMP_NUM_THREADS": "1"}
    nodes = {}
    for node in (1, 0):
        nodes[node] = subprocess.Popen(commands[node], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1.0)  # node 1's agent joins the rendezvous first
    outputs = {node: proc.communicate(timeout=240)[0] for node, proc in nodes.items()}
    assert [nodes[n].returncode for n in (0, 1)] == [0, 0], {n: out[-2000:] for n, out in outputs.items()}
    assert "[rank 0]" in outputs[0], outputs[0][-2000:]  # rank 0 logs its progress; the other ranks only warnings
    assert "[rank 0]" not in outputs[1], outputs[1][-2000:]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_causal_lm_with_lora(precision, corpus, tmp_path):
    doc = tiny.job_doc("lm", corpus["train"], corpus["eval"], corpus["tokenizer"], str(tmp_path / "ckpt"),
                       task="causal-lm", model__lora={"r": 4, "alpha": 8, "targetModules": ["c_attn"]},
                       training__precision=precision, training__maxSteps=8)
    run = tiny.LocalRun(tiny.write_job(tmp_path / "lm.yaml", doc), env={}, work_dir=tmp_path / "work")
    assert run.finish() == 0, run.output
    manifest = json.loads((tmp_path / "ckpt/tests/lm/step-000000008/manifest.json").read_text())
    last_eval = manifest["meta"]["state"]["last_eval"]
    assert last_eval["eval_perplexity"] == pytest.approx(math.exp(last_eval["eval_loss"]), rel=1e-6)
    state = torch.load(tmp_path / "ckpt/tests/lm/step-000000008/model.pt", weights_only=True)
    assert state and all("lora_" in k for k in state)  # only the adapters are trained and saved


def test_early_stopping_ends_the_job_and_a_rerun_trains_no_more(corpus, tmp_path):
    doc = tiny.job_doc("early", corpus["train"], corpus["eval"], corpus["tokenizer"], str(tmp_path / "ckpt"),
                       training__evalEverySteps=2, checkpoint__everySteps=100,
                       training__earlyStopping={"metric": "eval_loss", "patience": 1, "minDelta": 100.0})
    job = tiny.write_job(tmp_path / "early.yaml", doc)
    run = tiny.LocalRun(job, env={}, work_dir=tmp_path / "work")
    assert run.finish() == 0, run.output
    run.wait_for(r"early stopping at step 4: eval_loss did not improve for 1 evaluations")
    manifest = json.loads((tmp_path / "ckpt/tests/early/step-000000004/manifest.json").read_text())
    assert manifest["meta"]["reason"] == "final" and manifest["meta"]["state"]["evals_without_improvement"] == 1

    rerun = tiny.LocalRun(job, env={}, work_dir=tmp_path / "work")
    assert rerun.finish() == 0, rerun.output
    assert rerun.wait_for(r"resumed from \S+ at step (\d+)").group(1) == "4"
    assert not rerun.matches(r"step \d+/12 ")  # no step trained after the stop


@pytest.mark.parametrize("task", ["sequence-classification", "causal-lm"])
def test_packed_batches_train_and_evaluate(task, corpus, tmp_path):
    """spec.data.packing through the real CLI: the budget counts real tokens, the LM's loss falls, eval runs padded.

    That packed batches compute what padded ones do is tests/unit/test_packing.py's job."""
    # the LM with LoRA on one node; the classifier with LoRA (peft wraps the model) on 2 nodes (DDP over the packed model)
    extra = ({"model__lora": {"r": 4, "alpha": 8, "targetModules": ["c_attn"]}} if task == "causal-lm" else
             {"model__lora": {"r": 4, "alpha": 8, "targetModules": ["query", "value"]}, "nodes": 2})
    doc = tiny.job_doc("packed", corpus["train"], corpus["eval"], corpus["tokenizer"], str(tmp_path / "ckpt"), task=task,
                       data__packing=True, training__maxSteps=16, training__evalEverySteps=16, **extra)
    run = tiny.LocalRun(tiny.write_job(tmp_path / "packed.yaml", doc), env={}, work_dir=tmp_path / "work")
    assert run.finish() == 0, run.output
    losses = [float(m.group(1)) for m in run.matches(r"step \d+/16 .*\| loss ([\d.]+) ")]
    assert len(losses) == 16 and all(math.isfinite(v) for v in losses), losses
    if task == "causal-lm":
        assert sum(losses[-4:]) < sum(losses[:4]), losses
    manifest = json.loads((tmp_path / "ckpt/tests/packed/step-000000016/manifest.json").read_text())
    state = manifest["meta"]["state"]
    micro_batches = 16 * doc["spec"]["nodes"]
    assert micro_batches * 512 * 0.8 < state["tokens_seen"] <= micro_batches * 512  # packed to the real-token budget
    assert math.isfinite(state["last_eval"]["eval_loss"])


def test_a_rerun_names_its_start_applies_changed_settings_and_refuses_another_models_checkpoint(corpus, tmp_path):
    ckpt = tmp_path / "ckpt"

    def run(name: str = "same", **overrides) -> tuple[int, str]:
        doc = tiny.job_doc(name, corpus["train"], None, corpus["tokenizer"], str(ckpt), **overrides)
        done = tiny.LocalRun(tiny.write_job(tmp_path / f"{name}.yaml", doc), env={}, work_dir=tmp_path / "work")
        return done.finish(), done.output

    code, out = run(training__maxSteps=8)
    assert code == 0 and f"training from scratch: no complete checkpoint under {ckpt}/tests/same" in out
    # learning rate and steps changed: resumed, said, and the new learning rate is the one used
    code, out = run(training__maxSteps=12, training__learningRate=5e-4, training__warmupRatio=0)
    assert code == 0, out
    assert f"resumed from {ckpt}/tests/same/step-000000008 at step 8" in out
    assert ("settings changed since that checkpoint; this job's spec applies from step 8: training.maxSteps 8 -> 12; "
            "training.learningRate 0.001 -> 0.0005; training.warmupRatio 0.1 -> 0.0") in out
    lr_at_9 = float(re.search(r"step 9/12 .*\| lr (\S+) ", out)[1])
    assert lr_at_9 == pytest.approx(5e-4 * (1 - 9 / 12), rel=1e-3)  # linear decay from the new peak, new horizon
    # another model under the same name and prefix: refused, naming the checkpoint and the field
    code, out = run(model__numLabels=3, training__maxSteps=16)
    assert code == EXIT_PERMANENT
    assert (f"launch: checkpoint refused: {ckpt}/tests/same/step-000000012 was written for another model "
            "(model.numLabels 2 -> 3); refusing to resume it.") in out
    # resume: never trains this run from scratch, in a directory of its own
    code, out = run(model__numLabels=3, training__maxSteps=4, checkpoint__resume="never")
    assert code == 0, out
    started = re.search(rf"training from scratch: no complete checkpoint under {ckpt}/tests/same/([0-9a-f-]{{36}})", out)
    assert started and (ckpt / "tests/same" / started[1] / "step-000000004/manifest.json").exists()


def worker_of_rank(root_pid: int, rank: int) -> int:
    """The torchrun worker process of global `rank` among the descendants of `root_pid` (read from /proc)."""
    def children(pid: int) -> list[int]:
        found = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
        return found

    todo, seen = [root_pid], []
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo += children(pid)
    for pid in seen:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b"".join(env):
            return pid
    raise AssertionError(f"no worker of rank {rank} under {root_pid}")


def test_a_worker_killed_without_grace_loses_no_step_rank_0_saves_a_rescue_checkpoint(corpus, s3_server, s3_bucket,
                                                                                       tmp_path):
    common = dict(nodes=2, training__maxSteps=120, training__deterministic=True, checkpoint__everySteps=50,
                  checkpoint__keep=20, training__evalEverySteps=1000)
    env = s3_server.env()
    uninterrupted(tmp_path, corpus, s3_bucket, env, **common)

    job = make_job(tmp_path, corpus, "killed", f"s3://{s3_bucket}/ckpt", **common)
    first = tiny.LocalRun(job, env=env, work_dir=tmp_path / "w2")
    first.wait_for(r"step 20/120")
    os.kill(worker_of_rank(first.proc.pid, 1), signal.SIGKILL)  # no grace: rank 1 vanishes mid-step
    assert first.finish() not in (0, 75), first.output
    rescued = int(first.wait_for(r"rescue checkpoint of step (\d+) complete").group(1))
    last_trained = max(int(m.group(1)) for m in first.matches(r"step (\d+)/120"))
    # every step rank 0 finished is in it: the last logged one, or the next, when the peer died after rank 0's
    # optimizer step and before that step's log line (its loss is all-reduced: the collective that failed)
    assert last_trained >= 20 and rescued in (last_trained, last_trained + 1), (rescued, last_trained)
    assert manifests(s3_server, s3_bucket, "ckpt/tests/killed/")[rescued]["meta"]["reason"] == "rescue"

    second = tiny.LocalRun(job, env=env, work_dir=tmp_path / "w3")
    assert second.finish() == 0, second.output
    assert int(second.wait_for(r"resumed from \S+ at step (\d+)").group(1)) == rescued  # 0 steps lost
    assert_final_weights_equal(s3_server, s3_bucket, "killed", 120, tmp_path)  # bitwise equal to an uninterrupted run
