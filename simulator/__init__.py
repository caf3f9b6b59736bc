"""A gateway simulator: a TCP server that speaks enough of the IB API wire protocol for ``ibapi``.

See ``proto_docs/ib-wire-protocol.md`` for the messages it implements and
:class:`simulator.gateway.GatewaySimulator` for the fault injection tests use.
"""
