"""Provenance over Flight and HTTP: ``provenance`` adds a ``source`` column from the coverage table."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.flight as flight
import pytest

from ibstream.core.errors import InvalidRequestError
from ibstream.flight_server.commands import command
from ibstream.storage import Store
from ibstream.storage.schemas import SOURCE_FIELD, schema_for
from tests.helpers import Served, utc
from tests.storage.test_backfill import CID, EVERYTHING, from_ib, merged, record, scenario, settings_at


@pytest.fixture
def backfilled(tmp_path):
    market, g0, g1 = scenario(utc(2025, 1, 10, 23, 20), utc(2025, 1, 10, 23, 40))
    settings = settings_at(tmp_path / "data")
    record(settings, market, g0, g1)
    with Store(settings) as store:
        store.backfill(CID, "bid_ask", g0, g1, from_ib(market, g0, g1), status="backfilled")
        served = Served(store)
        yield served, merged(market, g0, g1), g0, g1
        served.close()


def test_ticks_say_where_they_came_from(backfilled):
    served, expected, g0, g1 = backfilled
    got = served.client.tables(CID, "bid_ask", *EVERYTHING, provenance=True)["bid_ask"]
    assert got.schema.remove_metadata() == schema_for("bid_ask").append(SOURCE_FIELD).remove_metadata()
    assert got.drop_columns(["source"]).replace_schema_metadata(None).equals(expected.replace_schema_metadata(None))
    ts = expected.column("ts").cast(pa.int64()).to_numpy()
    inside = int(((ts >= g0) & (ts < g1)).sum())
    counts = {row["values"]: row["counts"] for row in pc.value_counts(got.column("source").cast(pa.string())).to_pylist()}
    assert counts == {"live": expected.num_rows - inside, "backfill": inside}
    without = served.client.tables(CID, "bid_ask", *EVERYTHING)["bid_ask"]
    assert without.column_names == schema_for("bid_ask").names


def test_plain_pyarrow_gets_the_source_column_in_the_flight_info_schema(backfilled):
    served, expected, _, _ = backfilled
    with flight.connect(served.location) as plain:
        descriptor = flight.FlightDescriptor.for_command(command(CID, "bid_ask", *EVERYTHING, provenance=True))
        info = plain.get_flight_info(descriptor)
        assert info.schema.field("source").type == SOURCE_FIELD.type
        table = pa.concat_tables([plain.do_get(e.ticket).read_all() for e in info.endpoints])
    assert table.num_rows == expected.num_rows


def test_provenance_is_for_stored_ticks(backfilled):
    served, _, _, _ = backfilled
    with pytest.raises(InvalidRequestError, match=r"provenance \(the source column\) applies to ticks"):
        served.client.tables(CID, "bid_ask", *EVERYTHING, resolution="1m", provenance=True)
