"""The installed package exposes one import name, ``ibstream``, over the user's folders."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("storage", "recorder", "flight_server", "clients", "simulator")


def test_the_wheel_installs_exactly_one_top_level_name(tmp_path):
    source = tmp_path / "source"  # a clean copy: a stale build/ folder would leak old files into the wheel
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "data",
                                                                "results", "tests"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "wheel"), str(source)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "wheel").glob("ibstream-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = {name.split("/")[0] for name in archive.namelist()}
        assert {n for n in names if not n.endswith(".dist-info")} == {"ibstream"}
        assert {f"ibstream/{p}/__init__.py" for p in SUBPACKAGES} <= set(archive.namelist())
        assert {"ibstream/py.typed", "ibstream/storage/py.typed", "ibstream/clients/py.typed"} <= set(archive.namelist())
        site = tmp_path / "site"
        archive.extractall(site)  # a pure-Python wheel installs by unpacking

    # A fresh interpreter outside the repo (the repo root on sys.path would hide the point), with
    # our dependencies from this environment but not its editable install of ibstream.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    probe = ("import importlib.util, sys\n"
             "import ibstream.storage.store, ibstream.clients.client, ibstream.flight_server.server, ibstream.cli\n"
             "import ibstream.recorder.ib, ibstream.simulator.gateway, ibstream.core.ticks\n"
             "from ibstream import Client, Store, FlightServer, Settings, ServerBusyError\n"
             f"assert ibstream.storage.__file__.startswith({str(site)!r}), ibstream.storage.__file__\n"
             f"print([m for m in {SUBPACKAGES!r} if importlib.util.find_spec(m) is not None])\n")
    result = subprocess.run([sys.executable, "-S", "-c", f"import site; site.addsitedir({str(site)!r})\n" + probe],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", "no top-level storage, clients, ... beside ibstream"
