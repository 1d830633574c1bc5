"""The benchmark scripts run as ``python bench/<name>.py``, which puts bench/ first on ``sys.path``: a script
named like an installed module shadows it for every library the benchmark imports. transformers 5.25 began
importing the ``kernels`` package (a dependency of its own) when it loads a config class, and found
bench/kernels.py instead: every benchmark died before its first row."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

from tests.support import REPO

BENCH = REPO / "bench"


def _ours(module: pkgutil.ModuleInfo) -> bool:
    """Whether a module lies in this repository's folders (a virtualenv in it holds installed ones)."""
    folder = Path(getattr(module.module_finder, "path", "/")).resolve()
    return folder.is_relative_to(REPO.resolve()) and not folder.is_relative_to(Path(sys.prefix).resolve())


def test_no_bench_script_is_named_like_an_installed_module():
    scripts = {path.stem for path in BENCH.glob("*.py")}
    # Modules of this repository's own folders (pytest puts tests/ on the path) are not installed ones.
    installed = {module.name for module in pkgutil.iter_modules() if not _ours(module)}
    installed |= set(sys.stdlib_module_names)
    assert not scripts & installed, f"rename these bench scripts: {sorted(scripts & installed)}"


def test_transformers_loads_its_models_with_bench_first_on_the_path():
    # What a benchmark does first: build a tiny model from a config class, as bench/pipeline.py's rows do.
    script = ("import sys; sys.path.insert(0, sys.argv[1])\n"
              "import transformers\n"
              "config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,\n"
              "                                  num_attention_heads=2, vocab_size=64)\n"
              "transformers.AutoModelForCausalLM.from_config(config)\n"
              "transformers.Qwen2Config()\n")
    done = subprocess.run([sys.executable, "-c", script, str(BENCH)], capture_output=True, text=True,
                          timeout=120, cwd=BENCH)
    assert done.returncode == 0, done.stderr[-2000:]
