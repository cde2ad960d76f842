"""migrate.py: old configs and recipes -> config.yaml, old cache folders, the S3 access check."""

import os
import re
import socket
import subprocess
import sys

import pytest
from conftest import BUCKET, ROOT, iam_user, moto_auth

import io_stream
import migrate
import wmtp

LEGACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "legacy")
LOCAL, VESSL = f"{LEGACY}/config.local.yaml", f"{LEGACY}/config.vessl.yaml"
CRITIC, RHO1 = f"{LEGACY}/recipe.critic_wmtp.yaml", f"{LEGACY}/recipe.rho1_wmtp_tokenskip.yaml"
SECRETS = ("AKIAFAKEFAKEFAKEFAKE", "fake/secret/key/never/copy/me/0000000000")


def run_config(tmp_path, capsys, *args, out="config.yaml"):
    """Run `migrate.py config ARGS -o out`; return (exit code, output text or None, stdout, stderr)."""
    path = str(tmp_path / out)
    code = migrate.main(["config", *args, "-o", path])
    captured = capsys.readouterr()
    text = open(path).read() if os.path.exists(path) else None
    return code, text, captured.out, captured.err


def get(cfg, dotted):
    """cfg.a.b for 'a.b'."""
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_values(cfg, expected):
    """Compare the loaded config key by key (floats to 1e-12)."""
    for key, want in expected.items():
        assert get(cfg, key) == (
            pytest.approx(want, rel=1e-12) if isinstance(want, float) else want
        ), key


# Values read off the legacy files by hand. load_config makes local paths absolute (cwd = tmp_path).
def local_expected(tmp_path):
    return {
        "paths.models.base": str(tmp_path / "models/7b_1t_4"),
        "paths.models.rm": str(tmp_path / "models/Starling-RM-7B-alpha"),
        "paths.models.ref": str(tmp_path / "models/Sheared-LLaMA-2.7B"),
        "paths.datasets": {
            "mbpp": str(tmp_path / "dataset/mbpp"),
            "contest": str(tmp_path / "dataset/contest"),
            "humaneval": str(tmp_path / "dataset/humaneval"),
        },
        "paths.checkpoints": str(tmp_path / "checkpoints"),
        "s3.region": "ap-northeast-2",
        "s3.profile": "research",
        "s3.endpoint_url": None,
        "mlflow.experiment": "mtp/wmtp-local",
        "mlflow.tracking_uri": "sqlite:///mlflow.db",  # MLflow 3 refuses the old file:// store
        "mlflow.registry_uri": None,
        "mlflow.artifact_location": str(tmp_path / "runs/mlflow-artifacts"),  # the kit's default
        "train.seed": 42,
        "train.log_every": 10,
        "train.save_every": 50,
        "train.keep_last": 2,
    }


VESSL_EXPECTED = {
    "paths.models.base": "s3://wmtp/models/7b_1t_4",
    "paths.models.rm": "s3://wmtp/models/Starling-RM-7B-alpha",
    "paths.models.ref": "s3://wmtp/models/Sheared-LLaMA-2.7B",
    "paths.datasets": {"mbpp": "s3://wmtp/datasets/mbpp", "contest": "s3://wmtp/datasets/contest"},
    "paths.checkpoints": "s3://wmtp/checkpoints",
    "s3.region": "eu-north-1",
    "s3.profile": None,
    "mlflow.experiment": "wmtp/prod",
    "mlflow.tracking_uri": "http://mlflow.internal:5000",
    "mlflow.registry_uri": "http://mlflow.internal:5000",
    "mlflow.artifact_location": "s3://wmtp/mlflow-artifacts",
    "train.seed": 7,
    "train.log_every": 100,
    "train.save_every": 1000,
    "train.keep_last": 5,
    "data.train": ["mbpp", "contest"],  # no recipe: every old dataset
}

CRITIC_EXPECTED = {
    "train.algo": "critic",
    "train.run_name": "critic_wmtp_prod",
    "train.epochs": 3,
    "train.max_steps": 30000,
    "train.lr": 2e-5,
    "train.weight_decay": 0.01,
    "train.betas": (0.9, 0.999),
    "train.grad_clip": 1.0,
    "train.schedule": "cosine",
    "train.warmup_steps": 900,  # 0.03 x 30000
    "data.train": ["mbpp", "contest"],
    "data.max_length": 2048,
    "train.batch_size": 2,
    "critic.temperature": 0.7,
    "critic.eps": 0.05,
    "critic.max_weight": 3.0,
    "critic.discount": 0.95,
    "critic.gamma": 0.99,
    "critic.value_coef": 0.1,
    "critic.value_lr": 2e-6,
    "critic.lr": 1e-4,
    "critic.max_steps": 10000,
    "critic.patience": 50,
    "critic.min_delta": 1e-4,
}

RHO1_EXPECTED = {
    "train.algo": "rho1-tokenskip",
    "train.run_name": "rho1_tokenskip",
    "train.epochs": 1,
    "train.max_steps": 2000,
    "train.lr": 1e-5,
    "train.weight_decay": 0.1,
    "train.betas": (0.9, 0.95),
    "train.schedule": "constant",
    "train.warmup_steps": 0,
    "data.train": ["mbpp"],
    "data.max_length": 1024,
    "train.batch_size": 4,
    "rho1.keep_ratio": 0.7,  # 1 - skip_threshold_percentile 0.3
    "rho1.temperature": 0.7,
    "rho1.eps": 0.05,
    "rho1.max_weight": 3.0,
}


def test_local_config_converts(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, text, out, _ = run_config(tmp_path, capsys, LOCAL)
    assert code == 0
    expected = local_expected(tmp_path)
    expected["data.train"] = ["mbpp", "contest", "humaneval"]  # no recipe: every old dataset
    expected["train.lr"] = 1e-3  # not in the old file: the kit's default
    check_values(wmtp.load_config(str(tmp_path / "config.yaml")), expected)
    assert text.startswith("# WMTP kit config, migrated by `python migrate.py config` from:")
    for line in (
        "dropped  paths.cache = .cache:",
        "dropped  launcher:",
        "dropped  devices:",
        "fsdp.yaml",
        "dropped  paths.checkpoints.save_final = true: always on",
        "dropped  s3_auth.default_bucket = wmtp: no equivalent",
        "mapped   seed -> train.seed = 42",
        "mlflow migrate-filestore --source ./mlruns",
    ):
        assert line in out
    assert "cache" not in text.split("\n\n", 1)[1].replace(
        "no cache", ""
    )  # only the header says it


def test_vessl_config_converts_without_secrets(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, text, out, err = run_config(tmp_path, capsys, VESSL)
    assert code == 0
    check_values(wmtp.load_config(str(tmp_path / "config.yaml")), VESSL_EXPECTED)
    for secret in SECRETS:
        assert secret not in text and secret not in out and secret not in err
    assert "access_key" not in text
    assert "removed  s3_auth.access_key_id:" in out
    assert "removed  s3_auth.secret_access_key:" in out
    assert "AWS_ACCESS_KEY_ID" in out and "AWS_ACCESS_KEY_ID" in text


def test_recipes_convert(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, out, _ = run_config(tmp_path, capsys, LOCAL, "--recipe", CRITIC, out="critic.yaml")
    assert code == 0
    check_values(wmtp.load_config(str(tmp_path / "critic.yaml")), CRITIC_EXPECTED)
    for line in (
        "dropped  loss.lambda = 0.3",
        "dropped  eval:",
        "dropped  critic.normalize = zscore",
    ):
        assert line in out
    code, _, _, _ = run_config(tmp_path, capsys, VESSL, "--recipe", RHO1, out="rho1.yaml")
    assert code == 0
    check_values(wmtp.load_config(str(tmp_path / "rho1.yaml")), RHO1_EXPECTED)


def test_two_configs_first_wins_and_comments_switch(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, text, out, _ = run_config(tmp_path, capsys, LOCAL, VESSL)
    assert code == 0
    check_values(wmtp.load_config(str(tmp_path / "config.yaml")), local_expected(tmp_path))
    assert (
        "    base: models/7b_1t_4  # local\n    # base: s3://wmtp/models/7b_1t_4  # vessl\n" in text
    )
    assert "  profile: research  # local\n  # profile: null  # vessl (not set)\n" in text
    assert "files differ on" in out

    # Uncommenting every vessl line (and dropping the value above it) gives vessl's config.
    lines = text.split("\n")
    for i, line in enumerate(lines):
        m = re.fullmatch(r"(\s*)# (\w+: .*)  # vessl( \(not set\))?", line)
        if m:
            assert lines[i - 1].strip().startswith(m.group(2).split(":")[0] + ":")
            lines[i - 1], lines[i] = "", m.group(1) + m.group(2)
    (tmp_path / "switched.yaml").write_text("\n".join(lines))
    switched = wmtp.load_config(str(tmp_path / "switched.yaml"))
    expected = dict(VESSL_EXPECTED)
    expected["paths.datasets"] = {
        **expected["paths.datasets"],
        "humaneval": str(tmp_path / "dataset/humaneval"),
    }
    expected["data.train"] = ["mbpp", "contest", "humaneval"]
    check_values(switched, expected)


def test_recipes_merge_key_by_key(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rho1 = open(RHO1).read().replace("percentile: 0.3", "percentile: 0.35")
    rho1 = rho1.replace("temperature: 0.7\n  epsilon", "temperature: 0.5\n  epsilon")
    (tmp_path / "recipe.rho1.yaml").write_text(rho1)
    code, text, _, _ = run_config(
        tmp_path,
        capsys,
        LOCAL,
        VESSL,
        "--recipe",
        CRITIC,
        "--recipe",
        str(tmp_path / "recipe.rho1.yaml"),
    )
    assert code == 0
    cfg = wmtp.load_config(str(tmp_path / "config.yaml"))
    check_values(cfg, CRITIC_EXPECTED)  # the first recipe wins the shared keys
    check_values(cfg, {"rho1.keep_ratio": 0.65, "rho1.temperature": 0.5, "critic.temperature": 0.7})
    assert "  algo: critic  # critic_wmtp\n  # algo: rho1-tokenskip  # rho1\n" in text
    assert "  lr: 2.0e-05  # critic_wmtp\n  # lr: 1.0e-05  # rho1\n" in text


def test_idempotent_and_force(tmp_path, capsys):
    args = [LOCAL, VESSL, "--recipe", CRITIC, "--recipe", RHO1]
    code, first, _, _ = run_config(tmp_path, capsys, *args)
    assert code == 0
    (tmp_path / "config.yaml").write_text("mine\n")
    code, text, _, err = run_config(tmp_path, capsys, *args)
    assert code == 2 and text == "mine\n"
    assert "config.yaml exists; pass --force" in err and err.count("\n") == 1
    code, second, _, _ = run_config(tmp_path, capsys, *args, "--force")
    assert code == 0 and second == first


def test_unknown_keys_and_uri_credentials(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old = tmp_path / "config.old.yaml"
    old.write_text(
        "frobnicate: 3\n"
        "hf_token: hf_verysecretvalue\n"
        "mlflow:\n  tracking_uri: http://alice:pa55word@mlflow.internal:5000\n  tags: {team: x}\n"
        "paths:\n  datasets:\n    mbpp: file:///data/mbpp\n"
        "train:\n  algo: dpo\n"
    )
    code, text, out, _ = run_config(tmp_path, capsys, str(old))
    assert code == 0
    cfg = wmtp.load_config(str(tmp_path / "config.yaml"))
    check_values(
        cfg,
        {
            "mlflow.tracking_uri": "http://mlflow.internal:5000",
            "paths.datasets": {"mbpp": "/data/mbpp"},
            "train.algo": "baseline",  # dpo has no equivalent: the default stays
        },
    )
    assert "unknown  frobnicate = 3:" in out
    assert "unknown  mlflow.tags.team = x:" in out
    assert "unknown  train.algo = dpo:" in out
    assert "removed  hf_token:" in out
    assert "removed  mlflow.tracking_uri: user:password" in out
    for secret in ("hf_verysecretvalue", "pa55word", "alice"):
        assert secret not in text and secret not in out


def test_bad_input_is_one_line(tmp_path, capsys):
    bad = tmp_path / "config.bad.yaml"
    bad.write_text("seed: 1\npaths:\n\tcache: x\n")  # a tab on line 3
    code, text, _, err = run_config(tmp_path, capsys, str(bad))
    assert code == 2 and text is None
    assert (
        err
        == f"migrate.py config: error: {bad}: line 3: not valid YAML (found character '\\t' that cannot start any token)\n"
    )
    code, _, _, err = run_config(tmp_path, capsys, str(tmp_path / "missing.yaml"))
    assert code == 2 and "missing.yaml" in err and err.count("\n") == 1
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    code, _, _, err = run_config(tmp_path, capsys, str(tmp_path / "list.yaml"))
    assert code == 2 and "list.yaml: expected a mapping" in err
    (tmp_path / "recipe.nan.yaml").write_text("rho1:\n  skip_threshold_percentile: lots\n")
    code, _, _, err = run_config(
        tmp_path, capsys, LOCAL, "--recipe", str(tmp_path / "recipe.nan.yaml")
    )
    assert code == 2 and "recipe.nan.yaml: rho1.skip_threshold_percentile: expected a number" in err


def test_cli_exit_codes_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "migrate.py"),
            "config",
            str(bad),
            "-o",
            str(tmp_path / "o.yaml"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and f"{bad}: line 2: not valid YAML" in proc.stderr
    assert not (tmp_path / "o.yaml").exists()
    with pytest.raises(SystemExit) as exc:  # argparse: no -o
        migrate.main(["config", str(bad)])
    assert exc.value.code == 2 and "-o/--output" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# cleanup-cache


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project with an old .cache (tokenizer cache, a model, a link out), a config cache, and code."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.bin").write_bytes(b"x" * 4096)
    proj = tmp_path / "proj"
    (proj / ".cache" / "models").mkdir(parents=True)
    (proj / ".cache" / "tokenizer.model").write_bytes(b"t" * 512 * 1024)
    (proj / ".cache" / "models" / "w.bin").write_bytes(b"w" * 1024 * 1024)
    os.symlink(outside, proj / ".cache" / "link-out")
    (proj / "cache2").mkdir()
    (proj / "cache2" / "a.bin").write_bytes(b"a" * 3 * 1024)
    (proj / "train.py").write_text("print('keep me')\n")
    (proj / "config.local.yaml").write_text("paths:\n  cache: cache2\n")
    monkeypatch.chdir(proj)  # the old code took relative paths.cache from here
    return proj


def test_cleanup_dry_run_lists_and_keeps(project, capsys):
    code = migrate.main(["cleanup-cache", str(project), "--config", "config.local.yaml"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"{project}/.cache  1.5 MiB  (project .cache; holds the old tokenizer cache" in out
    assert f"{project}/cache2  3.0 KiB  (paths.cache of config.local.yaml)" in out
    assert "dry run: nothing deleted" in out
    assert (project / ".cache" / "tokenizer.model").exists() and (
        project / "cache2" / "a.bin"
    ).exists()


def test_cleanup_yes_deletes_only_caches(project, tmp_path, capsys):
    code = migrate.main(["cleanup-cache", str(project), "--config", "config.local.yaml", "--yes"])
    assert code == 0
    assert "deleted 2 old cache location(s)" in capsys.readouterr().out
    assert not os.path.lexists(project / ".cache") and not (project / "cache2").exists()
    assert sorted(os.listdir(project)) == ["config.local.yaml", "train.py"]
    assert (tmp_path / "outside" / "precious.bin").read_bytes() == b"x" * 4096  # link not followed


def test_cleanup_symlinked_cache_removes_only_the_link(project, tmp_path, capsys):
    (project / "cache2" / "a.bin").unlink()
    (project / "cache2").rmdir()
    os.symlink(tmp_path / "outside", project / "cache2")
    code = migrate.main(["cleanup-cache", str(project), "--config", "config.local.yaml", "--yes"])
    assert code == 0
    assert "a symlink: only the link goes" in capsys.readouterr().out
    assert not os.path.lexists(project / "cache2")
    assert (tmp_path / "outside" / "precious.bin").exists()


@pytest.mark.parametrize(
    "roots, cache, message",
    [
        (["/"], None, "refusing to clean / or the home folder"),
        (["HOME"], None, "refusing to clean / or the home folder"),
        (["TMP"], None, "refusing to clean / or the home folder"),  # contains the home folder
        (["PROJ"], "../outside", "not inside"),
        (["PROJ"], ".", "not inside"),  # the project itself
        (["PROJ"], "sub/../../outside", "not inside"),
    ],
)
def test_cleanup_refusals(project, tmp_path, capsys, roots, cache, message):
    roots = [
        {"HOME": str(tmp_path / "home"), "TMP": str(tmp_path), "PROJ": str(project)}.get(r, r)
        for r in roots
    ]
    args = ["cleanup-cache", *roots, "--yes"]
    if cache:
        (project / "sub").mkdir()
        (project / "bad.yaml").write_text(f"paths:\n  cache: {cache}\n")
        args += ["--config", "bad.yaml"]
    code = migrate.main(args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert (project / ".cache" / "tokenizer.model").exists()  # nothing deleted
    assert (tmp_path / "outside" / "precious.bin").exists()


# ---------------------------------------------------------------------------------------------
# verify-s3 on the moto server


def s3_keys(boto):
    """Every key in the test bucket."""
    return [o["Key"] for o in boto.list_objects_v2(Bucket=BUCKET).get("Contents", [])]


STEPS = [
    "list",
    "put",
    "get (ranged)",
    "if-match get",
    "multipart put",
    "if-none-match put",
    "if-match put",
    "delete",
]


def test_verify_s3_all_pass_and_leaves_nothing(s3, s3_endpoint, boto, capsys):
    boto.put_object(Bucket=BUCKET, Key="team/run/user.txt", Body=b"not ours")
    code = migrate.main(["verify-s3", f"{s3}/team/run", "--endpoint-url", s3_endpoint])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert [line.split("  ")[0].strip() for line in lines] == STEPS
    assert all(" PASS " in line for line in lines)
    assert "1 entries under" in lines[0]
    assert "206, Content-Range bytes 100-299/1024" in lines[2]
    assert f"{5 * 2**20 + 1024} bytes in 2 parts" in lines[4]
    assert all("honoured" in lines[i] for i in (3, 5, 6)), lines  # moto honours every condition
    assert s3_keys(boto) == ["team/run/user.txt"]


def test_verify_s3_missing_bucket(s3, capsys):
    code = migrate.main(["verify-s3", "s3://no-such-bucket-here/p"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 1 and len(lines) == len(STEPS), lines
    assert all(" FAIL " in ln and "no such bucket 'no-such-bucket-here'" in ln for ln in lines), (
        lines
    )


def test_verify_s3_access_denied(s3, s3_endpoint, boto, monkeypatch, capsys):
    boto.put_object(Bucket=BUCKET, Key="team/run/user.txt", Body=b"not ours")
    key_id, key_secret = iam_user(s3_endpoint, "read-only", ["s3:ListBucket", "s3:GetObject"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key_secret)
    moto_auth(s3_endpoint, b"0")
    try:
        code = migrate.main(["verify-s3", f"{s3}/team/run", "--endpoint-url", s3_endpoint])
    finally:
        moto_auth(s3_endpoint, b"inf")
    lines = capsys.readouterr().out.splitlines()
    assert code == 1, lines
    verdicts = {ln.split("  ")[0].strip(): ln for ln in lines}
    assert " PASS " in verdicts["list"] and "1 entries under" in verdicts["list"]
    for name in ("put", "multipart put", "if-none-match put"):
        assert " FAIL " in verdicts[name] and ": access denied (" in verdicts[name], lines
    assert " FAIL " in verdicts["get (ranged)"] and " FAIL " in verdicts["delete"], lines
    assert key_secret not in "\n".join(lines)
    assert s3_keys(boto) == ["team/run/user.txt"]


def test_verify_s3_unreachable_endpoint(s3, capsys):
    # A port bound but not listening refuses connections, and no other test can take it meanwhile.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
        code = migrate.main(["verify-s3", f"{s3}/p", "--endpoint-url", endpoint])
    lines = capsys.readouterr().out.splitlines()
    assert code == 1 and len(lines) == len(STEPS), lines
    assert all(" FAIL " in ln and f"endpoint unreachable ({endpoint})" in ln for ln in lines), lines


def test_verify_s3_cleans_up_after_failures(s3, boto, monkeypatch, capsys):
    real_remove = io_stream.remove
    calls = []

    def flaky_remove(path):
        calls.append(path)
        if len(calls) == 1:
            raise PermissionError(f"{path}: access denied")
        real_remove(path)

    monkeypatch.setattr(io_stream, "remove", flaky_remove)
    monkeypatch.setattr(io_stream, "file_size", lambda path: -1)  # multipart reads back wrong
    code = migrate.main(["verify-s3", f"{s3}/p"])
    out = capsys.readouterr().out
    assert code == 1
    assert re.search(r"multipart put +FAIL .*reads back wrong", out)
    assert re.search(r"delete +FAIL .*access denied", out)
    assert s3_keys(boto) == []


def test_verify_s3_rejects_local_path(capsys):
    assert migrate.main(["verify-s3", "/tmp/x"]) == 2
    assert "not an s3:// URI" in capsys.readouterr().err
