"""Futures chains: one conId and market per expiry, listed by reqContractDetails like IB lists them."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from ibapi.contract import Contract

from ibstream.simulator.gateway import GatewaySimulator
from ibstream.simulator.market import SIM_AAPL, SIM_CONTRACTS, SIM_MNQ, SIM_MNQ_CHAIN, futures_chain
from ibstream.storage.synthetic import MNQ
from tests.simulator.ibclient import IBClient, by_con_id


def test_the_mnq_chain():
    assert [(c.con_id, c.local_symbol, c.expiry) for c in SIM_MNQ_CHAIN] == [
        (711280073, "MNQZ6", "20261218"), (711280164, "MNQH7", "20270319"), (711280254, "MNQM7", "20270617")]
    assert SIM_MNQ_CHAIN[0] == SIM_MNQ and SIM_CONTRACTS == (SIM_MNQ, SIM_AAPL)
    assert [c.market.start_price for c in SIM_MNQ_CHAIN] == [21_000.0, 21_031.5, 21_063.0]
    assert {(c.trading_class, c.exchange, c.market.contract_id == c.con_id) for c in SIM_MNQ_CHAIN} == {
        ("MNQ", "CME", True)}


def test_month_codes_con_ids_and_bad_chains():
    chain = futures_chain("MNQ", [date(2027, m, 15) for m in range(1, 13)], con_ids=range(1, 13))
    assert "".join(c.local_symbol[3] for c in chain) == "FGHJKMNQUVXZ"
    assert [c.con_id for c in chain] == list(range(1, 13)) and chain[0].local_symbol == "MNQF7"
    assert futures_chain(MNQ, [date(2026, 12, 18)])[0] == SIM_MNQ
    for args, text in [(("ES", [date(2027, 3, 19)]), "knows the root 'MNQ'"),
                       ((SIM_AAPL, [date(2027, 3, 19)]), "needs a future"),
                       (("MNQ", [date(2027, 3, 19)] * 2), "distinct expiries"),
                       (("MNQ", []), "distinct expiries"),
                       (("MNQ", [date(2027, 3, 19)], [1, 2]), "one distinct conId per expiry")]:
        with pytest.raises(ValueError, match=text):
            futures_chain(*args)


def by_symbol(expiry: str = "", include_expired: bool = False) -> Contract:
    contract = Contract()
    contract.symbol, contract.secType, contract.exchange, contract.currency = "MNQ", "FUT", "CME", "USD"
    contract.lastTradeDateOrContractMonth = expiry
    contract.includeExpired = include_expired
    return contract


def test_contract_details_list_every_live_expiry():
    today = datetime.now(UTC).date()
    expiries = [today - timedelta(days=5), today + timedelta(days=10), today + timedelta(days=100),
                today + timedelta(days=190)]
    chain = futures_chain("MNQ", expiries)
    with GatewaySimulator(contracts=(*chain, SIM_AAPL)) as sim:
        client = IBClient(sim.port)
        try:
            listed = client.contract_details(by_symbol())
            assert [(d.contract.conId, d.contract.localSymbol, d.contract.lastTradeDateOrContractMonth,
                     d.realExpirationDate, d.contract.tradingClass, d.contract.exchange, d.contract.multiplier)
                    for d in listed] == [(c.con_id, c.local_symbol, c.expiry, c.expiry, "MNQ", "CME", "2")
                                         for c in chain[1:]]  # the expired one is left out
            assert [d.contract.conId for d in client.contract_details(by_symbol(include_expired=True))] == [
                c.con_id for c in chain]
            month = f"{expiries[2]:%Y%m}"
            assert [d.contract.conId for d in client.contract_details(by_symbol(month))] == [chain[2].con_id]
            assert [d.contract.conId for d in client.contract_details(by_con_id(chain[0].con_id))] == [chain[0].con_id]
            assert [d.contract.localSymbol for d in client.contract_details(by_con_id(SIM_AAPL.con_id))] == ["AAPL"]
        finally:
            client.close()
