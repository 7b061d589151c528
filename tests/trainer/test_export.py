"""spec.output: a finished job leaves a model that transformers, PEFT and onnxruntime load and serve.

Real local runs (`kubetrain run --local`, torchrun, gloo), then the output loaded the way a user would:
`AutoModelForSequenceClassification.from_pretrained` + `AutoTokenizer.from_pretrained` predict the eval
set with the trainer's own last eval accuracy and give the data's string labels back; model.onnx under
onnxruntime predicts the same; a LoRA LM exported merged generates what its adapter generates.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kubetrain_testkit import tiny

pytestmark = pytest.mark.slow

LABEL_NAMES = {0: "negative", 1: "positive"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """The sentiment corpus with string labels (what users have), and a tokenizer trained on it."""
    out = tmp_path_factory.mktemp("corpus")
    train, evals = tiny.write_corpus(out)
    for path in (train, evals):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({**r, "label": LABEL_NAMES[int(r["label"])]}) + "\n" for r in rows))
    return {"train": train, "eval": evals, "tokenizer": tiny.train_tokenizer(out / "tokenizer", train)}


def run_job(tmp_path: Path, corpus: dict, name: str, **overrides) -> tiny.LocalRun:
    tmp_path.mkdir(parents=True, exist_ok=True)
    doc = tiny.job_doc(name, corpus["train"], corpus["eval"], corpus["tokenizer"], str(tmp_path / "ckpt"), **overrides)
    run = tiny.LocalRun(tiny.write_job(tmp_path / f"{name}.yaml", doc), env={}, work_dir=tmp_path / "work")
    assert run.finish() == 0, run.output[-4000:]
    return run


def eval_rows(corpus: dict) -> list[dict]:
    return [json.loads(line) for line in corpus["eval"].read_text().splitlines()]


def test_a_finished_classifier_is_a_hugging_face_model_and_an_onnx_model_that_predict_as_it_evaluated(
        tmp_path: Path, corpus: dict, s3_server, s3_bucket: str) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "model"
    run = run_job(tmp_path, corpus, "export-cls", training__maxSteps=40, training__evalEverySteps=40,
                  output={"uri": str(out), "formats": ["hf", "onnx"]})
    accuracy = float(run.matches(r"eval at step 40 .*eval_accuracy ([0-9.]+)")[-1].group(1))
    manifest = json.loads((out / "kubetrain-export.json").read_text())
    assert manifest["step"] == 40 and manifest["formats"] == ["hf", "onnx"] and manifest["kind"] == "full model"
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "model.onnx"} <= set(manifest["files"])
    assert manifest["onnx_max_abs_diff"] <= 1e-4

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.id2label == LABEL_NAMES and model.config.label2id == {v: k for k, v in LABEL_NAMES.items()}
    rows = eval_rows(corpus)
    batch = tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    predicted = [model.config.id2label[i] for i in logits.argmax(-1).tolist()]
    assert np.mean([p == r["label"] for p, r in zip(predicted, rows)]) == pytest.approx(accuracy, abs=1e-4)

    import onnxruntime

    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(["logits"], {"input_ids": batch["input_ids"].numpy(),
                                              "attention_mask": batch["attention_mask"].numpy()})
    assert (onnx_logits.argmax(-1) == logits.argmax(-1).numpy()).all()
    assert np.abs(onnx_logits - logits.numpy()).max() < 1e-4

    card = (out / "README.md").read_text()
    assert "eval_accuracy" in card and "onnxruntime parity passed" in card and "step-000000040" in card
    assert re.search(r"train data: .*train.jsonl \(tokens [0-9a-f]{16}\)", card)

    # `kubetrain export` of the final checkpoint, to S3: the same weights, labels and ONNX graph
    checkpoint = tmp_path / "ckpt" / "tests" / "export-cls" / "step-000000040"
    done = subprocess.run([sys.executable, "-m", "kubetrain.cli", "export", str(checkpoint), "--job",
                           str(tmp_path / "export-cls.yaml"), "--to", f"s3://{s3_bucket}/models/cls", "--format", "onnx"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **s3_server.env()})
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"exported step 40 of {checkpoint} to s3://{s3_bucket}/models/cls (hf, onnx)" in done.stdout
    client = s3_server.client()
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="models/cls/")["Contents"]}
    remote = json.loads(client.get_object(Bucket=s3_bucket, Key="models/cls/kubetrain-export.json")["Body"].read())
    assert {f"models/cls/{name}" for name in remote["files"]} | {"models/cls/kubetrain-export.json"} == keys
    assert remote["files"]["model.safetensors"] == manifest["files"]["model.safetensors"]  # the same bytes
    assert remote["metrics"] == manifest["metrics"] and remote["onnx_max_abs_diff"] <= 1e-4


def test_export_refuses_a_path_that_is_not_a_checkpoint_in_one_line(tmp_path: Path, corpus: dict) -> None:
    doc = tiny.job_doc("no-ckpt", corpus["train"], corpus["eval"], corpus["tokenizer"], str(tmp_path / "ckpt"))
    job = tiny.write_job(tmp_path / "job.yaml", doc)
    for checkpoint, says in ((tmp_path / "ckpt", "not a checkpoint directory"),
                             (tmp_path / "ckpt" / "tests" / "no-ckpt" / "step-000000004", "no complete checkpoint there")):
        done = subprocess.run([sys.executable, "-m", "kubetrain.cli", "export", str(checkpoint), "--job", str(job),
                               "--to", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
        assert done.returncode == 65 and says in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not (tmp_path / "out").exists()


def test_a_lora_lm_exported_merged_generates_what_its_adapter_generates(tmp_path: Path, corpus: dict) -> None:
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(corpus["tokenizer"])
    pretrained = tmp_path / "base"  # a "pretrained" tiny GPT-2, as users bring one
    torch.manual_seed(0)
    config = AutoConfig.for_model(**{**tiny.TINY_GPT2, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.eos_token_id,
                                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id})
    AutoModelForCausalLM.from_config(config).save_pretrained(pretrained)

    lora = {"r": 4, "alpha": 8, "targetModules": ["c_attn"]}
    common = dict(task="causal-lm", model__name=str(pretrained), model__lora=lora, training__maxSteps=12,
                  training__learningRate=5e-2)
    adapter_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    run_job(tmp_path / "a", corpus, "lm-adapter", output={"uri": str(adapter_dir)}, **common)
    run_job(tmp_path / "m", corpus, "lm-merged", output={"uri": str(merged_dir), "mergeLora": True, "formats": ["hf", "onnx"]},
            **common)
    assert json.loads((adapter_dir / "kubetrain-export.json").read_text())["kind"] == "LoRA adapter"
    assert json.loads((merged_dir / "kubetrain-export.json").read_text())["kind"] == "merged LoRA model"
    assert (adapter_dir / "adapter_config.json").is_file() and not (merged_dir / "adapter_config.json").exists()
    assert (merged_dir / "generation_config.json").is_file()
    assert json.loads((merged_dir / "kubetrain-export.json").read_text())["onnx_max_abs_diff"] <= 1e-4  # causal-LM logits

    base = AutoModelForCausalLM.from_pretrained(pretrained).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pretrained), adapter_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    prompt = tokenizer(["the film was", "a dull and"], return_tensors="pt", padding=True)
    args = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        want, got, untrained = adapted.generate(**prompt, **args), merged.generate(**prompt, **args), base.generate(**prompt, **args)
        logits_adapted, logits_merged = adapted(**prompt).logits, merged(**prompt).logits
    assert torch.equal(got, want)
    assert torch.allclose(logits_merged, logits_adapted, atol=1e-4)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(merged_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(["logits"], {"input_ids": prompt["input_ids"].numpy(),
                                              "attention_mask": prompt["attention_mask"].numpy()})
    real = prompt["attention_mask"].bool().numpy()
    assert np.abs(onnx_logits[real] - logits_merged.numpy()[real]).max() < 1e-4
    assert not torch.allclose(logits_merged, base(**prompt).logits, atol=1e-3)  # training changed the model
    assert untrained.shape == got.shape


def test_an_fsdp_run_exports_its_gathered_shards_and_its_sharded_checkpoint_exports_the_same(tmp_path: Path,
                                                                                            corpus: dict) -> None:
    from safetensors.torch import load_file

    live, stored = tmp_path / "live", tmp_path / "stored"
    run_job(tmp_path, corpus, "export-fsdp", procsPerNode=2, training__strategy="fsdp", training__maxSteps=8,
            output={"uri": str(live)})
    checkpoint = tmp_path / "ckpt" / "tests" / "export-fsdp" / "step-000000008"
    assert (checkpoint / "shards" / ".metadata").is_file()  # a sharded checkpoint: no model.pt
    done = subprocess.run([sys.executable, "-m", "kubetrain.cli", "export", str(checkpoint), "--job",
                           str(tmp_path / "export-fsdp.yaml"), "--to", str(stored)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = load_file(live / "model.safetensors"), load_file(stored / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((live / "config.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}


def test_output_from_best_exports_the_best_evaluations_weights_kept_through_retention(tmp_path: Path, corpus: dict) -> None:
    """mode max on eval_loss: while training lowers the loss, the first evaluation stays the best one."""
    from safetensors.torch import load_file

    out = tmp_path / "best"
    run_job(tmp_path, corpus, "export-best", training__maxSteps=16, training__evalEverySteps=4,
            training__earlyStopping={"metric": "eval_loss", "mode": "max", "patience": 100},
            checkpoint__everySteps=100, checkpoint__keep=1, output={"uri": str(out), "from": "best"})
    manifest = json.loads((out / "kubetrain-export.json").read_text())
    prefix = tmp_path / "ckpt" / "tests" / "export-best"
    assert manifest["step"] == 4 and manifest["checkpoint"].endswith("step-000000004"), manifest
    kept = sorted(p.name for p in prefix.iterdir())
    assert kept == ["step-000000004", "step-000000016"], kept  # keep: 1, and the best one
    assert json.loads((prefix / "step-000000004" / "manifest.json").read_text())["meta"]["reason"] == "best"
    trained = torch.load(prefix / "step-000000004" / "model.pt", weights_only=True)
    exported = load_file(out / "model.safetensors")
    assert set(exported) <= set(trained) and all(torch.equal(exported[k], trained[k]) for k in exported)
    final = torch.load(prefix / "step-000000016" / "model.pt", weights_only=True)
    assert not all(torch.equal(exported[k], final[k]) for k in exported)
    assert manifest["metrics"]["eval_loss"] > 0 and "eval_loss" in (out / "README.md").read_text()
