"""jobs/runtime.py: what every job does before its main runs."""

import pytest

from jobs.runtime import run_cli

KEY = "LLMREC_CHECKPOINT_KEY"


def _run(argv):
    """run_cli over a main that records its config: -> (exit code, the configs main saw)."""
    seen = []
    try:
        run_cli(seen.append, argv=argv)
    except SystemExit as exc:
        return exc.code, seen
    return 0, seen


@pytest.fixture
def no_cluster_env(monkeypatch):
    monkeypatch.delenv(KEY, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return monkeypatch


@pytest.mark.parametrize("argv, env", [
    (["ray.address=ray://head:10001"], {}),
    ([], {"RAY_ADDRESS": "http://127.0.0.1:8265"}),  # what `ray job submit` gives the driver
    (["storage.root=s3://bucket/recsys"], {}),
    (["storage.root=s3://bucket/recsys"], {KEY: ""}),  # empty: unsigned, as checkpoints.py reads it
])
def test_a_job_on_a_cluster_or_shared_storage_refuses_to_start_without_the_checkpoint_key(
        no_cluster_env, capsys, argv, env):
    for k, v in env.items():
        no_cluster_env.setenv(k, v)
    code, seen = _run(argv)
    err = capsys.readouterr().err
    assert code == 2 and seen == []
    assert f"error: {KEY} is not set" in err
    assert "kubectl create secret generic llmrec-checkpoint-key" in err
    assert "security.allow_unsigned_checkpoints=true" in err


@pytest.mark.parametrize("argv, env", [
    (["storage.root=s3://bucket/recsys"], {KEY: "k" * 64}),
    ([], {"RAY_ADDRESS": "http://127.0.0.1:8265", KEY: "k" * 64}),
    (["ray.address=ray://head:10001", "security.allow_unsigned_checkpoints=true"], {}),
    (["storage.root=s3://bucket/recsys", "security.allow_unsigned_checkpoints=true"], {}),
])
def test_a_job_on_a_cluster_runs_with_the_key_or_the_explicit_opt_out(no_cluster_env, argv, env):
    for k, v in env.items():
        no_cluster_env.setenv(k, v)
    code, seen = _run(argv)
    assert code == 0 and len(seen) == 1


def test_a_local_job_needs_no_key(no_cluster_env, tmp_path):
    """The README's commands: no address, file:// storage, no key set."""
    for root in (str(tmp_path / "store"), f"file://{tmp_path}/store"):
        code, seen = _run([f"storage.root={root}"])
        assert code == 0 and seen[0].storage.root == root
