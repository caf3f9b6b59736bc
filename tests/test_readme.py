"""The README's Python examples run as written against a server holding the last week of
MNQ and AAPL quotes and trades (with the contract details the recorder stores)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ibstream.settings import Settings
from ibstream.simulator.market import SIM_AAPL, SIM_MNQ
from ibstream.storage import Store
from ibstream.storage.synthetic import AAPL, MNQ
from tests.helpers import Served, append_in_batches, market

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    """The ```python blocks between '## Using it' and the next top-level section."""
    section = text.split("## Using it", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.fixture
def week_to_now(tmp_path):
    now = datetime.now(UTC)
    settings = Settings(data_root=tmp_path / "data", rotation_interval=timedelta(hours=1), flight_port=0,
                        fsync="none", archive_delay=timedelta(0))
    with Store(settings) as store:
        for sim, contract in ((SIM_MNQ, MNQ), (SIM_AAPL, AAPL)):
            store.index.upsert_contract(sim.details(now.date() - timedelta(days=3), days=10))
            for tick_type, rate in (("bid_ask", 0.2), ("last", 0.1)):
                table = market(contract, tick_type, now - timedelta(days=8), now - timedelta(seconds=30), rate,
                               seed=contract.contract_id % 89)
                append_in_batches(store, table, batch=20_000, contract_id=contract.contract_id)
        served = Served(store)
        yield served
        served.close()


def test_readme_examples_run(week_to_now, capsys):
    blocks = python_blocks(README.read_text())
    assert len(blocks) == 6
    namespace: dict = {}
    for block in blocks:
        exec(compile(block.replace("grpc://127.0.0.1:8815", week_to_now.location), "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "AAPL session VWAP" in printed and "5-minute mid-price correlation MNQ/AAPL" in printed
    assert "MNQ trades so far; resume point" in printed and namespace["position"]["live"] is False
    assert namespace["live"].frame.height > 0 and namespace["trades"].height > 0
    assert namespace["bars"].height > 1_000 and namespace["by_day"].height >= 7
    assert namespace["wide"].columns == ["ts", "711280073", "265598"] and namespace["wide"].height > 1_000
    assert namespace["pair"].get_column("contract_id").unique().sort().to_list() == [AAPL.contract_id,
                                                                                      MNQ.contract_id]
