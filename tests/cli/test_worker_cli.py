"""``azu-worker`` does not guess who it is or where its core is: it refuses to start, says what to pass and
which defaults it would use, and creates nothing."""

from __future__ import annotations

import pytest

from azu.cli import worker

CORE_VARIABLES = ("AZU_CORE_URL", "AZU_WORKER_ID", "AZU_WORKER_KEY_FILE", "AZU_CACHE_DIR")


@pytest.fixture
def bare(monkeypatch, tmp_path):
    for name in CORE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    execs: list[list[str]] = []
    return tmp_path, lambda _path, argv, _env: execs.append(argv), execs


@pytest.mark.parametrize(("argv", "missing", "named"), [
    ([], {"--worker-id", "--core-url"}, set()),
    (["--worker-id", "gpu-1"], {"--core-url"}, {"--worker-id"}),
    (["--core-url", "http://127.0.0.1:9"], {"--worker-id"}, {"--core-url"}),
])
def test_refuses_without_core_or_id_and_says_what_to_pass(bare, capsys, argv, missing, named):
    folder, exec_fn, execs = bare
    assert worker.main(argv, exec_fn=exec_fn) == 2
    err = capsys.readouterr().err
    for option in missing:
        assert f"pass {option}" in err
    for option in named:
        assert f"pass {option}" not in err
    assert "start it as: azu-worker --core-url https://<core> --worker-id <id>" in err
    assert "key file <cache dir>/worker.key" in err and ".azu/cache/<worker id>" in err
    assert execs == []
    assert list(folder.iterdir()) == []  # no key made, no cache folder: nothing happened


def test_an_id_from_the_environment_is_used_and_said(bare, capsys, monkeypatch):
    """With AZU_WORKER_ID and AZU_CORE_URL set, it says in one line which id, key, cache and device it
    uses."""
    _folder, exec_fn, execs = bare
    monkeypatch.setenv("AZU_WORKER_ID", "from-env")
    monkeypatch.setenv("AZU_CORE_URL", "http://127.0.0.1:9")
    # What is checked is the line printed before enrolling; enrollment itself (retried for two minutes
    # against a core that is not there) is cut short. tests/security runs it for real.
    def refused(*_args: object, **_kwargs: object) -> dict[str, object]:
        raise worker.EnrollmentFailed("no core here")

    monkeypatch.setattr(worker, "enroll", refused)
    assert worker.main(["--device", "cpu"], exec_fn=exec_fn) == 1
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("azu-worker: worker id"))
    assert "worker id from-env" in line and ".azu/cache/from-env" in line and "device cpu" in line
    assert "enrolling at http://127.0.0.1:9" in line
    assert execs == []


def test_invalid_id_is_refused_with_the_rule(bare, capsys):
    _folder, exec_fn, _execs = bare
    assert worker.main(["--worker-id", "Bad:Id", "--core-url", "http://x"], exec_fn=exec_fn) == 2
    assert "must be 1-40 characters of a-z, 0-9 and '-'" in capsys.readouterr().err


def test_the_wallet_message_needs_no_core(bare, capsys):
    folder, exec_fn, execs = bare
    key_file = folder / "w.key"
    code = worker.main(["--worker-id", "gpu-1", "--key-file", str(key_file), "--print-wallet-message",
                        "--wallet", "0x" + "ab" * 20], exec_fn=exec_fn)
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("azu worker gpu-1 key ") and ("0x" + "ab" * 20) in out
    assert key_file.is_file() and execs == []
