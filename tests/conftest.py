"""Shared fixtures: a real S3 API (moto server on 127.0.0.1) and isolated environments."""

import json
import os
import socket
import sys
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import io_stream  # noqa: E402

BUCKET = "wmtp-test"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """Start one moto S3 server for the session; s3fs is async, so the in-process mock can't reach it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    old = {
        k: os.environ.get(k)
        for k in (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL",
        )
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing-secret-value",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    os.environ.pop("AWS_PROFILE", None)
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3(s3_endpoint):
    """A fresh moto state with one empty bucket; yields its s3:// root."""
    import boto3

    urllib.request.urlopen(
        urllib.request.Request(f"{s3_endpoint}/moto-api/reset", method="POST")
    ).read()
    io_stream.configure_s3()  # drop cached filesystems and any explicit settings
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=BUCKET
    )
    yield f"s3://{BUCKET}"
    io_stream.configure_s3()


@pytest.fixture
def boto(s3_endpoint):
    """A boto3 S3 client on the moto server (an independent path to the same bytes)."""
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """Run a test once on a local folder and once on an S3 prefix."""
    if request.param == "local":
        yield str(tmp_path / "root")
    else:
        yield request.getfixturevalue("s3") + "/root"


def moto_auth(endpoint: str, count: bytes) -> None:
    """Tell moto after how many requests it starts checking signatures ("0" = now, "inf" = off)."""
    req = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=count,
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    urllib.request.urlopen(req).read()


MOTO_NAMES = {"s3:ListBucket": "s3:ListObjectsV2", "s3:GetObject": "s3:HeadObject"}


def iam_user(endpoint: str, name: str, actions: list[str]) -> tuple[str, str]:
    """A moto IAM user allowed only `actions` on every resource; returns its (key id, secret)."""
    import boto3

    # moto 5.2.6 checks a list against "s3:ListObjectsV2" and a HEAD against "s3:HeadObject",
    # actions AWS does not have (they are s3:ListBucket and s3:GetObject): grant its names too
    actions = [*actions, *(MOTO_NAMES[a] for a in actions if a in MOTO_NAMES)]
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
    iam.create_user(UserName=name)
    key = iam.create_access_key(UserName=name)["AccessKey"]
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
    }
    iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=json.dumps(policy))
    return key["AccessKeyId"], key["SecretAccessKey"]


@pytest.fixture
def clean_mlflow(monkeypatch):
    """Each test gets its own tracking URI; no MLflow run left active, no run-folder lock held."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    import mlflow

    while mlflow.active_run():
        mlflow.end_run()
    if "wmtp_runs" in sys.modules:
        sys.modules["wmtp_runs"].release_run_locks()
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # mlflow.set_tracking_uri exports it
