"""The recorder's row -> Arrow batch conversion: its fast paths equal pyarrow's own conversion exactly."""

from __future__ import annotations

from decimal import Decimal

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ibstream.core.ticks import TickType
from ibstream.recorder.recorder import rows_to_batch
from ibstream.storage.schemas import schema_for

LIMIT = 10**10  # decimal128(18, 8) holds whole numbers below this
MICROS = st.integers(0, 2**62)
SIZES = st.one_of(st.integers(-LIMIT + 1, LIMIT - 1), st.sampled_from([0, 1, LIMIT - 1, -(LIMIT - 1)]),
                  st.decimals(min_value=-(LIMIT - 1), max_value=LIMIT - 1, places=8, allow_nan=False,
                              allow_infinity=False))


def reference(tick_type: TickType, rows: list[tuple]) -> pa.RecordBatch:
    schema = schema_for(tick_type)
    return pa.RecordBatch.from_arrays([pa.array([row[i] for row in rows], type=f.type) for i, f in enumerate(schema)],
                                      schema=schema)


quote_rows = st.lists(st.tuples(MICROS, MICROS, st.floats(allow_nan=False), st.floats(allow_nan=False), SIZES, SIZES,
                                st.booleans(), st.booleans()), min_size=1, max_size=40)
trade_rows = st.lists(st.tuples(MICROS, MICROS, st.floats(allow_nan=False), SIZES, st.text(max_size=5),
                                st.text(max_size=5), st.booleans(), st.booleans()), min_size=1, max_size=40)


@settings(deadline=None)  # the first Decimal conversion imports pandas
@given(quote_rows)
def test_quote_rows_convert_exactly_as_pyarrow_does(rows):
    assert rows_to_batch(TickType.BID_ASK, rows).equals(reference(TickType.BID_ASK, rows))


@settings(deadline=None)
@given(trade_rows)
def test_trade_rows_convert_exactly_as_pyarrow_does(rows):
    assert rows_to_batch(TickType.ALL_LAST, rows).equals(reference(TickType.ALL_LAST, rows))


@pytest.mark.parametrize("size", [LIMIT, -LIMIT, 2**63 - 1, 10**30, -(10**30)])
def test_a_size_too_large_for_the_column_is_refused_as_pyarrow_refuses_it(size):
    rows = [(1, 1, 1.0, 2.0, 1, size, False, False)]
    with pytest.raises(pa.ArrowInvalid):
        reference(TickType.BID_ASK, rows)
    with pytest.raises(pa.ArrowInvalid):
        rows_to_batch(TickType.BID_ASK, rows)


def test_fractional_and_mixed_sizes_keep_their_digits():
    rows = [(1, 1, 1.0, 2.0, Decimal("0.00000001"), 3, False, False), (2, 1, 1.0, 2.0, 7, Decimal("12.5"), True, False)]
    batch = rows_to_batch(TickType.BID_ASK, rows)
    assert batch.column("bid_size").to_pylist() == [Decimal("0.00000001"), Decimal("7")]
    assert batch.column("ask_size").to_pylist() == [Decimal("3"), Decimal("12.5")]


def test_a_float_size_is_refused_as_pyarrow_refuses_it_not_truncated():
    """pyarrow's int64 conversion would truncate 2.5 to 2; the fast path takes only exact Python ints."""
    rows = [(1, 1, 1.0, 2.0, 2.5, 1, False, False)]
    with pytest.raises(pa.ArrowTypeError):
        reference(TickType.BID_ASK, rows)
    with pytest.raises(pa.ArrowTypeError):
        rows_to_batch(TickType.BID_ASK, rows)
