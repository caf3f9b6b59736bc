"""A fault-injecting HTTP/1.1 proxy in front of an S3-compatible server (moto), for tests.

Each request is read whole, then forwarded, or answered by the next queued fault whose rule
matches its method and path: ``503`` (SlowDown), ``200error`` (an ``<Error>`` body in a 200, as S3
answers a failed CompleteMultipartUpload), ``stall`` (no answer for ``stall_seconds``, then close),
``reset`` (RST) or ``drop_response`` (forwarded and applied, but the answer never arrives).
``proxy.log`` records (method, path, fault) per request.
"""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Callable

_ERROR = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>%s</Code><Message>injected by the test proxy'
          b'</Message></Error>')


class FaultProxy:
    def __init__(self, upstream: tuple[str, int], stall_seconds: float = 8.0):
        self.upstream, self.stall_seconds = upstream, stall_seconds
        self.rules: list[list] = []
        self.log: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def fail(self, times: int, kind: str = "503", match: Callable[[str, str], bool] = lambda method, path: True):
        """Answer the next ``times`` matching requests with fault ``kind``."""
        with self._lock:
            self.rules.append([times, kind, match])

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def close(self) -> None:
        self._closed.set()
        self._sock.close()

    def _fault_for(self, method: str, path: str) -> str | None:
        with self._lock:
            for rule in self.rules:
                if rule[0] > 0 and rule[2](method, path):
                    rule[0] -= 1
                    return rule[1]
        return None

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        try:
            while True:
                line = reader.readline()
                if not line:
                    return
                method, path, _ = line.decode().split(" ", 2)
                headers = []
                while (header := reader.readline()) not in (b"\r\n", b""):
                    name, value = header.decode().split(":", 1)
                    headers.append((name.strip(), value.strip()))
                lower = {name.lower(): value for name, value in headers}
                if lower.get("expect", "").lower() == "100-continue":  # else the client waits a second per PUT
                    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    headers = [(n, v) for n, v in headers if n.lower() != "expect"]
                body = reader.read(int(lower["content-length"])) if "content-length" in lower else b""
                if lower.get("transfer-encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(reader.readline().split(b";")[0], 16):
                        chunks.append(reader.read(size))
                        reader.readline()
                    while reader.readline() not in (b"\r\n", b""):
                        pass
                    body = b"".join(chunks)
                    headers = [(n, v) for n, v in headers if n.lower() != "transfer-encoding"]
                    headers.append(("Content-Length", str(len(body))))
                fault = self._fault_for(method, path)
                self.log.append((method, path, fault))
                if fault in ("503", "200error"):
                    status = b"503 Slow Down" if fault == "503" else b"200 OK"
                    message = _ERROR % (b"SlowDown" if fault == "503" else b"InternalError")
                    conn.sendall(b"HTTP/1.1 %s\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n\r\n%s"
                                 % (status, len(message), message))
                    continue
                if fault == "stall":
                    self._closed.wait(self.stall_seconds)
                    return
                if fault == "reset":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    return
                upstream = http.client.HTTPConnection(*self.upstream, timeout=60)
                upstream.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
                for name, value in headers:
                    upstream.putheader(name, value)
                upstream.endheaders(body)
                answer = upstream.getresponse()
                data = answer.read()
                upstream.close()
                if fault == "drop_response":
                    return
                lines = [f"HTTP/1.1 {answer.status} {answer.reason}"] + [
                    f"{n}: {v}" for n, v in answer.getheaders()
                    if n.lower() not in ("transfer-encoding", "content-length", "connection")]
                lines.append(f"Content-Length: {answer.getheader('Content-Length', '0') if method == 'HEAD' else len(data)}")
                conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
        except (OSError, ValueError):
            return
        finally:
            try:
                conn.close()
            except OSError:
                pass
