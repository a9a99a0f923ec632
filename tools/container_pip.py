"""Hand the host's pip configuration to a container build (used by tools/container.sh build).

Reads the effective pip settings of this machine (``pip config list``: config files and ``PIP_*`` variables) and
writes, into an output folder that the build mounts read-only at ``/run/divnorm-pip``:

* ``pip.conf``: index URLs, find-links, constraints, CA bundle, timeouts, with every local path rewritten to
  where it is mounted inside the build (``/run/divnorm-host/<host path>``);
* ``env.sh``: ``PIP_CONFIG_FILE`` and ``PIP_CERT`` pointing at those, sourced by the Dockerfile's RUN steps;
* ``mounts``: one ``buildah bud -v`` argument a line (``HOST:CONTAINER:ro``) for each local path.

So pip inside the build uses the wheels and indexes the host already has (no second download) and trusts the
host's CA bundle (on a network whose TLS is inspected, pip fails with CERTIFICATE_VERIFY_FAILED without it).
Standard library only: it runs with whatever ``python3`` the host has.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

HOST_ROOT = "/run/divnorm-host"  # where host paths are mounted inside the build
PIP_DIR = "/run/divnorm-pip"  # where the output folder is mounted inside the build
DEFAULT_CA = "/etc/ssl/certs/ca-certificates.crt"  # Debian / Ubuntu bundle, used when pip names none
# settings copied into the build; anything else in the host's config (e.g. user, target) is left out on purpose
KEYS = (
    "index-url",
    "extra-index-url",
    "find-links",
    "constraint",
    "cert",
    "trusted-host",
    "default-timeout",
    "retries",
)


def effective_config(python: str) -> dict[str, str]:
    """The host pip's effective value for each of KEYS: ``PIP_*`` variables over the install section over global."""
    out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True).stdout
    found: dict[tuple[str, str], str] = {}
    for line in out.splitlines():
        m = re.fullmatch(r"(:env:|global|install)\.([\w-]+)='(.*)'", line.strip())
        if m:
            found[(m.group(1), m.group(2))] = m.group(3)
    config = {}
    for key in KEYS:
        for section in (":env:", "install", "global"):
            if (section, key) in found:
                config[key] = found[(section, key)]
                break
    return config


class Mounts:
    """Host paths to mount read-only under HOST_ROOT, without nesting one mount inside another."""

    def __init__(self) -> None:
        self.paths: set[Path] = set()

    def add(self, host_path: str) -> str:
        """Mount ``host_path`` (its real path) and return where it appears inside the build."""
        real = Path(host_path).resolve()
        self.paths.add(real)
        return HOST_ROOT + str(real)

    def args(self) -> list[str]:
        """``-v`` values, outermost paths only (a path inside a mounted folder is visible through it)."""
        kept: list[Path] = []
        for p in sorted(self.paths, key=lambda p: len(p.parts)):
            if not any(p == k or k in p.parents for k in kept):
                kept.append(p)
        return [f"{p}:{HOST_ROOT}{p}:ro" for p in sorted(kept)]


def local_path(entry: str) -> str | None:
    """The local path an index / find-links entry names (a path or a file:// URL), or None for a remote URL."""
    if entry.startswith("file://"):
        return unquote(urlparse(entry).path)
    return None if "://" in entry else entry


def translate(config: dict[str, str], mounts: Mounts) -> dict[str, str]:
    """The settings with every existing local path replaced by its place inside the build."""
    result = {}
    for key, value in config.items():
        if key in ("index-url", "extra-index-url", "find-links"):
            entries = []
            for entry in value.split():
                path = local_path(entry)
                if path is None:
                    entries.append(entry)
                elif Path(path).exists():
                    if key == "find-links":
                        inside = mounts.add(path)
                    else:
                        # a PEP 503 index folder (.../simple) may link to files beside it (../../files):
                        # mount its parent and address the index through it
                        real = Path(path).resolve()
                        inside = mounts.add(str(real.parent)) + "/" + real.name
                    entries.append("file://" + inside if entry.startswith("file://") else inside)
            if entries:
                result[key] = " ".join(entries)
        elif key == "constraint":
            files = [mounts.add(f) for f in value.split() if Path(f).is_file()]
            if files:
                result[key] = " ".join(files)
        elif key == "cert":
            continue  # handled by main: mounted at a fixed place
        else:
            result[key] = value
    return result


def main(argv: list[str]) -> int:
    """``container_pip.py OUT_DIR [PYTHON]``: write pip.conf, env.sh and mounts into OUT_DIR; print a summary."""
    if len(argv) not in (2, 3):
        print("usage: python3 tools/container_pip.py OUT_DIR [PYTHON]", file=sys.stderr)
        return 2
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    python = argv[2] if len(argv) == 3 else sys.executable
    mounts = Mounts()
    try:
        config = effective_config(python)
    except (OSError, subprocess.CalledProcessError):
        config = {}
        print(f"container: no pip configuration read from {python} -m pip; the build uses PyPI directly")
    settings = translate(config, mounts)
    ca = config.get("cert") or os.environ.get("PIP_CERT") or DEFAULT_CA
    env = [f"export PIP_CONFIG_FILE={PIP_DIR}/pip.conf"]
    if Path(ca).is_file():
        settings["cert"] = mounts.add(ca)
        env.append(f"export PIP_CERT={settings['cert']}")
    # temp file + rename: a build never mounts a half-written file
    files = {
        "pip.conf": "[global]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(settings.items())),
        "env.sh": "# sourced by the Dockerfile's RUN steps (tools/container_pip.py)\n" + "\n".join(env) + "\n",
        "mounts": "".join(f"{m}\n" for m in mounts.args()) + f"{out.resolve()}:{PIP_DIR}:ro\n",
    }
    for name, text in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    for key, value in sorted(settings.items()):
        print(f"container:   pip {key} = {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
