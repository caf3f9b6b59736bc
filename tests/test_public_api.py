"""``from ibstream import ...``: the entry objects and the errors, loaded on first use."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import ibstream

BLOCKED = ["apscheduler", "ibapi", "ibstream.storage", "ibstream.flight_server.server", "ibstream.recorder",
           "ibstream.simulator"]


def test_the_client_loads_neither_storage_nor_the_server_apscheduler_or_ibapi(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from importlib.abc import MetaPathFinder

        class Blocked(MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if any(name == b or name.startswith(b + ".") for b in {BLOCKED!r}):
                    raise ImportError(f"{{name}} is blocked")

        sys.meta_path.insert(0, Blocked())
        from ibstream import Client, ServerBusyError
        client = Client("grpc://127.0.0.1:1")
        print(sorted(m for m in sys.modules if m.startswith(("ibstream.storage", "apscheduler", "ibapi"))))
        """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_public_names_are_the_real_objects():
    from ibstream.clients.client import Client
    from ibstream.core.errors import ServerBusyError
    from ibstream.flight_server.server import FlightServer
    from ibstream.settings import Settings
    from ibstream.storage.store import Store

    assert (ibstream.Client, ibstream.Store, ibstream.FlightServer, ibstream.Settings, ibstream.ServerBusyError) == (
        Client, Store, FlightServer, Settings, ServerBusyError)
    assert ibstream.__version__ == "0.1.0"
    assert set(ibstream.__all__) <= set(dir(ibstream))
    try:
        ibstream.NoSuchThing
    except AttributeError as exc:
        assert "no attribute 'NoSuchThing'" in str(exc)
    else:
        raise AssertionError("an unknown name must raise AttributeError")
