"""Does the pyarrow Flight client follow FlightEndpoint.locations? Two servers; A's get_flight_info points at B."""
import pyarrow as pa, pyarrow.flight as fl
class S(fl.FlightServerBase):
    def __init__(self, name, other=None):
        super().__init__("grpc://127.0.0.1:0"); self.name = name; self.other = other; self.gets = 0
    def get_flight_info(self, ctx, d):
        locs = [self.other] if self.other else []
        return fl.FlightInfo(pa.schema([("who", pa.string())]), d, [fl.FlightEndpoint(b"t", locs)], -1, -1)
    def do_get(self, ctx, t):
        self.gets += 1; return fl.RecordBatchStream(pa.table({"who": [self.name]}))
b = S("B"); a = S("A", f"grpc://127.0.0.1:{b.port}")
c = fl.connect(f"grpc://127.0.0.1:{a.port}")
info = c.get_flight_info(fl.FlightDescriptor.for_command(b"q"))
ep = info.endpoints[0]; print("endpoint locations:", ep.locations)
print("client.do_get(ep.ticket) on A's client ->", c.do_get(ep.ticket).read_all().column("who").to_pylist(), f"(A gets={a.gets}, B gets={b.gets})")
loc = ep.locations[0]; print("client code connecting to the location ->", fl.connect(loc).do_get(ep.ticket).read_all().column("who").to_pylist())
print("Location.reuse_connection available:", hasattr(fl.Location, "reuse_connection"), fl.Location.reuse_connection() if hasattr(fl.Location, "reuse_connection") else "")
# failover: first location dead
dead = "grpc://127.0.0.1:1"
for l in [dead, loc]:
    try: print("try", l, "->", fl.connect(l).do_get(ep.ticket, options=fl.FlightCallOptions(timeout=2)).read_all().num_rows, "rows"); break
    except fl.FlightUnavailableError as e: print("try", l, "-> FlightUnavailableError", str(e)[:80])
