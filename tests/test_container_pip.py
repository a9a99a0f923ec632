"""tools/container_pip.py: the host's pip settings rewritten for a container build (paths, mounts, CA bundle)."""

import os
import subprocess
import sys
from pathlib import Path

from tools.container_pip import HOST_ROOT, PIP_DIR, Mounts, translate

REPO = Path(__file__).resolve().parents[1]


def test_translate_mounts_local_paths_and_keeps_remote_urls(tmp_path: Path) -> None:
    index = tmp_path / "pypi" / "simple"
    index.mkdir(parents=True)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("torch<=2.14.1\n")
    mounts = Mounts()
    settings = translate(
        {
            "extra-index-url": f"file://{index} https://example.org/simple file:///nonexistent/simple",
            "find-links": f"{wheels} {tmp_path / 'missing'}",
            "constraint": str(constraints),
            "default-timeout": "180",
        },
        mounts,
    )
    # an index is mounted through its parent (its pages link to ../../files beside it); a missing path is dropped
    assert settings["extra-index-url"] == f"file://{HOST_ROOT}{index} https://example.org/simple"
    assert settings["find-links"] == f"{HOST_ROOT}{wheels}"
    assert settings["constraint"] == f"{HOST_ROOT}{constraints}"
    assert settings["default-timeout"] == "180"
    assert sorted(mounts.args()) == sorted(
        f"{p}:{HOST_ROOT}{p}:ro" for p in (tmp_path / "pypi", wheels, constraints.resolve())
    )


def test_mounts_skip_paths_inside_a_mounted_folder(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    mounts = Mounts()
    inner = mounts.add(str(tmp_path / "a" / "b"))
    mounts.add(str(tmp_path / "a"))
    assert inner == f"{HOST_ROOT}{tmp_path}/a/b"  # still reachable, through the outer mount
    assert mounts.args() == [f"{tmp_path}/a:{HOST_ROOT}{tmp_path}/a:ro"]


def test_main_writes_pip_conf_env_and_mounts_from_pip_config(tmp_path: Path) -> None:
    index = tmp_path / "idx" / "simple"
    index.mkdir(parents=True)
    ca = tmp_path / "ca.crt"
    ca.write_text("not a real certificate; only mounted\n")
    conf = tmp_path / "host-pip.conf"
    conf.write_text(f"[global]\nindex-url = file://{index}\ncert = {ca}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = str(conf)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "tools/container_pip.py", str(out)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    pip_conf = (out / "pip.conf").read_text()
    assert f"index-url = file://{HOST_ROOT}{index}\n" in pip_conf
    assert f"cert = {HOST_ROOT}{ca}\n" in pip_conf
    assert (out / "env.sh").read_text().splitlines()[1:] == [
        f"export PIP_CONFIG_FILE={PIP_DIR}/pip.conf",
        f"export PIP_CERT={HOST_ROOT}{ca}",
    ]
    mounts = (out / "mounts").read_text().splitlines()
    assert f"{tmp_path / 'idx'}:{HOST_ROOT}{tmp_path / 'idx'}:ro" in mounts
    assert f"{ca}:{HOST_ROOT}{ca}:ro" in mounts
    assert mounts[-1] == f"{out.resolve()}:{PIP_DIR}:ro"
