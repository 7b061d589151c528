"""The S3 fault proxy of the dev cluster: real boto3 through it to a real moto server."""

from __future__ import annotations

import threading
import time

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

from kubetrain_devcluster.s3 import ACCESS_KEY, REGION, SECRET_KEY, S3Server
from kubetrain_devcluster.s3faults import S3FaultProxy

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def proxy():
    with S3Server() as s3, S3FaultProxy(s3.endpoint) as proxy:
        s3.create_bucket("bkt")
        yield proxy


@pytest.fixture
def client(proxy):
    proxy.clear()
    return boto3.session.Session().client(
        "s3", endpoint_url=proxy.endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 1}))


def test_requests_pass_through_unchanged_multipart_and_head_included(client, tmp_path):
    big = tmp_path / "big"
    big.write_bytes(bytes(range(256)) * (12 * MiB // 256))
    parts = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    client.upload_file(str(big), "bkt", "k/big", Config=parts)
    assert client.head_object(Bucket="bkt", Key="k/big")["ContentLength"] == 12 * MiB
    client.download_file("bkt", "k/big", str(tmp_path / "back"), Config=parts)
    assert (tmp_path / "back").read_bytes() == big.read_bytes()


def test_a_refusal_is_s3s_503_slowdown_for_matching_requests_only_and_ends_on_time(proxy, client):
    client.put_object(Bucket="bkt", Key="other/x", Body=b"x")
    # long enough that botocore's own retries on a loaded 2-core machine end inside it (1 s did not, once)
    armed = time.monotonic()
    proxy.arm({"status": 503, "seconds": 5.0, "pathRegex": "/bkt/job-a/"})
    with pytest.raises(ClientError) as err:
        client.put_object(Bucket="bkt", Key="job-a/x", Body=b"x")
    assert err.value.response["Error"]["Code"] == "SlowDown"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    client.put_object(Bucket="bkt", Key="other/y", Body=b"y")  # another prefix is not affected
    report = proxy.report()
    assert report["refused"] >= 1 and report["faults"] and report["faults"][0]["hits"] >= 1  # botocore may retry
    while proxy.report()["faults"] and time.monotonic() - armed < 15:
        time.sleep(0.1)
    assert proxy.report()["faults"] == [] and time.monotonic() - armed >= 5.0  # ended, and not before its time
    client.put_object(Bucket="bkt", Key="job-a/x", Body=b"x")


def test_a_delay_holds_matching_requests_in_flight(proxy, client):
    proxy.arm({"delaySeconds": 1.0, "methods": ["PUT"], "count": 1})
    done = threading.Event()
    started = time.monotonic()
    threading.Thread(target=lambda: (client.put_object(Bucket="bkt", Key="slow", Body=b"s"), done.set())).start()
    time.sleep(0.5)
    assert proxy.report()["inFlight"] == {"PUT": 1} and not done.is_set()
    assert done.wait(5) and time.monotonic() - started >= 1.0
    client.get_object(Bucket="bkt", Key="slow")  # GET not delayed, and the count is used up
    assert proxy.report()["delayed"] == 1


def test_a_fault_without_status_or_delay_is_refused(proxy):
    with pytest.raises(ValueError):
        proxy.arm({"methods": ["PUT"]})
