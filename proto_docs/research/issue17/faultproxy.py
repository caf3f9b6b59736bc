"""A tiny HTTP/1.1 fault-injecting proxy in front of moto (or any S3 endpoint).

Each client connection gets a thread; each request is read (headers + Content-Length body), then
either answered by a queued fault (503 SlowDown, or a stall before closing) or forwarded to upstream
on a fresh connection. Faults are queued per matching rule: proxy.fail(n, match=lambda method, path: ...,
kind="503"|"stall"|"reset"|"200error"). Every request is recorded in proxy.log.
"""
import socket, threading, time, http.client

class FaultProxy:
    def __init__(self, upstream_host, upstream_port, stall_seconds=30):
        self.up = (upstream_host, upstream_port); self.stall = stall_seconds
        self.rules = []; self.log = []; self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0)); self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def fail(self, n, kind="503", match=lambda m, p: True):
        with self.lock: self.rules.append([n, kind, match])

    def _fault_for(self, method, path):
        with self.lock:
            for r in self.rules:
                if r[0] > 0 and r[2](method, path):
                    r[0] -= 1; return r[1]
        return None

    def _accept(self):
        while True:
            c, _ = self.sock.accept(); threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        f = c.makefile("rb")
        try:
            while True:
                line = f.readline()
                if not line: return
                method, path, _ = line.decode().split(" ", 2)
                headers = []
                while (h := f.readline()) not in (b"\r\n", b""):
                    k, v = h.decode().split(":", 1); headers.append((k.strip(), v.strip()))
                hd = {k.lower(): v for k, v in headers}
                if hd.get("expect", "").lower() == "100-continue":   # curl otherwise waits 1 s before the body
                    c.sendall(b"HTTP/1.1 100 Continue\r\n\r\n"); headers = [(k, v) for k, v in headers if k.lower() != "expect"]
                body = f.read(int(hd.get("content-length", 0))) if "content-length" in hd else b""
                if hd.get("transfer-encoding", "").lower() == "chunked":   # aws-chunked/streaming bodies
                    chunks = []
                    while (size := int(f.readline().split(b";")[0], 16)):
                        chunks.append(f.read(size)); f.readline()
                    while f.readline() not in (b"\r\n", b""): pass
                    body = b"".join(chunks); headers = [(k, v) for k, v in headers if k.lower() != "transfer-encoding"]
                    headers.append(("Content-Length", str(len(body))))
                fault = self._fault_for(method, path)
                self.log.append((time.time(), method, path[:120], fault))
                if fault == "503":
                    msg = b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>'
                    c.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n\r\n%s" % (len(msg), msg)); continue
                if fault == "200error":
                    msg = b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>'
                    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n\r\n%s" % (len(msg), msg)); continue
                if fault == "stall":
                    time.sleep(self.stall); c.close(); return
                if fault == "reset":
                    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"); c.close(); return
                up = http.client.HTTPConnection(*self.up, timeout=60)
                up.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
                for k, v in headers: up.putheader(k, v)
                up.endheaders(body)
                r = up.getresponse(); data = r.read()
                if fault == "drop_response":   # upstream did the work; the client never hears of it
                    up.close(); c.close(); return
                self.log[-1] = self.log[-1] + (r.status, data[:300] if method == "POST" else b"")
                out = [f"HTTP/1.1 {r.status} {r.reason}"] + [f"{k}: {v}" for k, v in r.getheaders()
                       if k.lower() not in ("transfer-encoding", "content-length", "connection")]
                out.append(f"Content-Length: {r.getheader('Content-Length', '0') if method == 'HEAD' else len(data)}")
                c.sendall(("\r\n".join(out) + "\r\n\r\n").encode() + data); up.close()
        except (OSError, ValueError):
            return
        finally:
            try: c.close()
            except OSError: pass
