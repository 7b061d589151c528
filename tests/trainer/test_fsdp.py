"""training.strategy: fsdp, end to end as real torchrun processes (gloo): FSDP2 trains what DDP trains with
about half the memory per rank at two ranks, its sharded checkpoints resume exactly and on other world
sizes (same samples per step, same learning rate), and a torn or damaged sharded checkpoint is never loaded."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
import torch

from kubetrain_testkit import tiny

pytestmark = pytest.mark.slow

# grouped-query attention: 4 query heads share 2 key/value heads
LLAMA_GQA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
STEP = re.compile(r"step (\d+)/\d+ .*\| loss (\S+) \| lr (\S+) \| grad (\S+) .*\| data (\w+)")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("corpus")
    train, evals = tiny.write_corpus(out, n_train=300, n_eval=40)
    return {"train": train, "eval": evals, "tokenizer": tiny.train_tokenizer(out / "tokenizer", train)}


def job(tmp_path: Path, corpus: dict, name: str, ckpt: Path, *, lm: bool = True, **overrides) -> Path:
    model = {"model__config": LLAMA_GQA} if lm else {}
    doc = tiny.job_doc(name, corpus["train"], corpus["eval"], corpus["tokenizer"], str(ckpt),
                       task="causal-lm" if lm else "sequence-classification", **model, **overrides)
    return tiny.write_job(tmp_path / f"{name}-{len(list(tmp_path.glob('*.yaml')))}.yaml", doc)


def train(path: Path, tmp_path: Path, expect: int = 0) -> tiny.LocalRun:
    run = tiny.LocalRun(path, env={}, work_dir=tmp_path / "work")
    assert run.finish() == expect, run.output[-5000:]
    return run


def steps(run: tiny.LocalRun) -> dict[int, tuple[str, ...]]:
    """step -> (loss, lr, grad norm, data fingerprint) as logged"""
    return {int(m.group(1)): m.groups()[1:] for m in run.matches(STEP.pattern)}


def memory(run: tiny.LocalRun) -> float:
    m = run.wait_for(r"memory on this rank \(\w+\): parameters ([\d.]+) MB, optimizer state ([\d.]+) MB")
    return float(m.group(1)) + float(m.group(2))


@pytest.mark.parametrize("lm", [True, False], ids=["llama-gqa", "bert-classifier"])
def test_fsdp_trains_what_ddp_trains_with_half_the_memory_per_rank(lm, corpus, tmp_path):
    common = dict(lm=lm, procsPerNode=2, training__maxSteps=20, training__logEverySteps=1, checkpoint__everySteps=100)
    ddp = train(job(tmp_path, corpus, "ddp", tmp_path / "ckpt", **common), tmp_path)
    # the Llama under fsdp also compiles its blocks (compile: regional): fsdp's hooks stay eager around them
    compiled = {"training__compile": "regional"} if lm else {}
    fsdp = train(job(tmp_path, corpus, "fsdp", tmp_path / "ckpt", training__strategy="fsdp", **common, **compiled), tmp_path)
    assert not lm or "compile: regional, 2 transformer blocks" in fsdp.output
    a, b = steps(ddp), steps(fsdp)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    for step in a:
        assert a[step][3] == b[step][3] and a[step][1] == b[step][1], step  # same samples, same learning rate
        assert float(b[step][0]) == pytest.approx(float(a[step][0]), rel=1e-3, abs=1e-3), (step, a[step], b[step])
    assert memory(fsdp) <= 0.6 * memory(ddp), (memory(fsdp), memory(ddp))  # 1/2 of it on each of 2 ranks, and the rest


def resumed(run: tiny.LocalRun) -> int:
    return int(run.wait_for(r"resumed from \S+ at step (\d+)").group(1))


def preempt(path: Path, tmp_path: Path, after: int) -> int:
    """Run until step `after`, SIGTERM it (what the kubelet sends), return the step its emergency checkpoint holds."""
    run = tiny.LocalRun(path, env={}, work_dir=tmp_path / "work")
    run.wait_for(rf"step {after}/")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 75, run.output[-5000:]
    return int(run.wait_for(r"emergency checkpoint at step (\d+) saved").group(1))


def final_weights(step_dir: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / f"{step_dir.parent.name}-{step_dir.name}.pt"
    dcp_to_torch_save(step_dir / "shards", out)
    return torch.load(out, weights_only=True)["shards"]["model"]


def test_sharded_checkpoints_resume_exactly_and_reshard_2_to_1_and_1_to_2(corpus, tmp_path):
    # linear decay after warmup: a resumed run on another world size must keep the same learning-rate horizon
    common = dict(training__strategy="fsdp", training__maxSteps=24, training__deterministic=True,
                  training__warmupSteps=4, checkpoint__everySteps=5, checkpoint__keep=10)
    straight = train(job(tmp_path, corpus, "straight", tmp_path / "a", procsPerNode=2, **common), tmp_path)
    want = steps(straight)

    # 2 -> 2: bitwise the same weights as the uninterrupted run
    same = job(tmp_path, corpus, "same", tmp_path / "b", procsPerNode=2, **common)
    stopped = preempt(same, tmp_path, after=9)
    again = train(same, tmp_path)
    assert resumed(again) == stopped
    assert {s: v for s, v in steps(again).items() if s > stopped} == {s: v for s, v in want.items() if s > stopped}
    a = final_weights(tmp_path / "a/tests/straight/step-000000024", tmp_path)
    b = final_weights(tmp_path / "b/tests/same/step-000000024", tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "sharded resume is not exact"

    # 2 -> 1: the lone process accumulates two micro-batches per step: the same steps, data and learning rate
    two = job(tmp_path, corpus, "shrink", tmp_path / "c", procsPerNode=2, **common)
    stopped = preempt(two, tmp_path, after=9)
    one = train(job(tmp_path, corpus, "shrink", tmp_path / "c", procsPerNode=1, **common), tmp_path)
    assert resumed(one) == stopped and "world size 2 -> 1: gradient accumulation 2" in one.output
    after = {s: v for s, v in steps(one).items() if s > stopped}
    assert sorted(after) == list(range(stopped + 1, 25))
    for s, (loss, lr, _, data) in after.items():
        assert (data, lr) == (want[s][3], want[s][1]), s
        assert float(loss) == pytest.approx(float(want[s][0]), rel=1e-3), s

    # 1 -> 2: a step of two accumulated micro-batches becomes one micro-batch on each of two processes
    lone = job(tmp_path, corpus, "grow", tmp_path / "d", procsPerNode=1, training__gradientAccumulation=2, **common)
    stopped = preempt(lone, tmp_path, after=9)
    pair = train(job(tmp_path, corpus, "grow", tmp_path / "d", procsPerNode=2, training__gradientAccumulation=2,
                     **common), tmp_path)
    assert resumed(pair) == stopped and "world size 1 -> 2: gradient accumulation 1" in pair.output
    for s, (loss, lr, _, data) in ((s, v) for s, v in steps(pair).items() if s > stopped):
        assert (data, lr) == (want[s][3], want[s][1]), s
        assert float(loss) == pytest.approx(float(want[s][0]), rel=1e-3), s


def test_a_torn_or_damaged_sharded_checkpoint_is_never_loaded(corpus, s3_server, s3_bucket, tmp_path):
    """Through the S3 protocol: every rank uploads its part, rank 0's manifest lists them all."""
    env = s3_server.env()
    common = dict(procsPerNode=2, training__strategy="fsdp", checkpoint__everySteps=4)
    path = job(tmp_path, corpus, "torn", f"s3://{s3_bucket}/ckpt", training__maxSteps=12, **common)
    assert tiny.LocalRun(path, env=env, work_dir=tmp_path / "w").finish() == 0
    client, prefix = s3_server.client(), "ckpt/tests/torn"
    manifest_files = {int(k.split("/")[-2][5:]) for k in keys(client, s3_bucket, prefix) if k.endswith("manifest.json")}
    assert manifest_files == {4, 8, 12}
    shards = [k for k in keys(client, s3_bucket, f"{prefix}/step-000000012/") if "/shards/" in k]
    assert sorted(k.rsplit("/", 1)[1] for k in shards) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    client.delete_object(Bucket=s3_bucket, Key=f"{prefix}/step-000000012/manifest.json")  # torn: manifest missing
    client.delete_object(Bucket=s3_bucket, Key=f"{prefix}/step-000000008/shards/__1_0.distcp")  # a part missing

    rerun = tiny.LocalRun(job(tmp_path, corpus, "torn", f"s3://{s3_bucket}/ckpt", training__maxSteps=16, **common),
                          env=env, work_dir=tmp_path / "w")
    assert rerun.finish() == 0, rerun.output[-5000:]
    assert resumed(rerun) == 4
    assert "skipping corrupt checkpoint step 8" in rerun.output


def keys(client, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_a_ddp_checkpoint_is_refused_by_an_fsdp_job_naming_the_strategy(corpus, tmp_path):
    train(job(tmp_path, corpus, "switch", tmp_path / "ckpt", training__maxSteps=4), tmp_path)
    run = train(job(tmp_path, corpus, "switch", tmp_path / "ckpt", training__maxSteps=8, training__strategy="fsdp"),
                tmp_path, expect=65)
    assert "written with training.strategy ddp (whole-model files); this job uses fsdp" in run.output
