"""scripts/setup_env.sh (what CI and the README's commands run first) stops before pip when
the disk cannot hold a new .venv: a full disk otherwise fails deep inside pip, minutes in."""

import os
import shutil
import subprocess

from tests import REPO


def test_setup_stops_at_once_on_a_disk_too_full_for_a_new_venv(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "setup_env.sh", tmp_path / "scripts")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    df = bin_dir / "df"  # a disk with 1 GB free
    df.write_text("#!/bin/sh\necho 'Filesystem 1024-blocks Used Available Capacity Mounted on'\n"
                  "echo '/dev/vda 264241152 263192576 1048576 100% /'\n")
    df.chmod(0o755)
    result = subprocess.run(["bash", "scripts/setup_env.sh"], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, timeout=60)
    assert result.returncode == 1
    assert "a new .venv needs about 6.5 GB" in result.stderr and "has 1024 MB free" in result.stderr
    assert not (tmp_path / ".venv").exists()  # nothing was started
