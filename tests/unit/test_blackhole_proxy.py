"""tests/blackhole.py: the proxy forwards, a blackhole hangs every connection without closing it,
and `resume()` serves new connections while the old ones stay dead."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.blackhole import BlackholeProxy

HANG_SECONDS = 0.5


class EchoServer:
    """Echoes each connection's bytes back; remembers which connections saw EOF from the proxy."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.closed_by_peer = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    with self._lock:
                        self.closed_by_peer += 1
                    return
                conn.sendall(data)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo):
    with BlackholeProxy("127.0.0.1", echo.port) as running:
        yield running


def connect(proxy: BlackholeProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    sock.settimeout(5)
    return sock


def roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def assert_hangs(sock: socket.socket) -> None:
    """Writes still succeed, and a read neither gets data nor EOF nor an error: it times out."""
    sock.sendall(b"anyone there?")
    sock.settimeout(HANG_SECONDS)
    with pytest.raises(TimeoutError):
        sock.recv(1)
    sock.settimeout(5)


def test_forwards_both_ways_and_passes_the_close_on(proxy, echo):
    with connect(proxy) as sock:
        payload = bytes(range(256)) * 4096  # 1 MiB: more than one chunk and one buffer
        assert roundtrip(sock, payload) == payload
    deadline = time.monotonic() + 5
    while echo.closed_by_peer < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert echo.closed_by_peer == 1


def test_a_blackholed_connection_hangs_and_stays_dead_after_resume(proxy, echo):
    old = connect(proxy)
    assert roundtrip(old, b"hello") == b"hello"

    proxy.blackhole()
    assert_hangs(old)
    during = connect(proxy)  # accepted, never forwarded
    assert_hangs(during)
    assert echo.accepted == 1  # nothing reached the target during the blackhole

    proxy.resume()
    with connect(proxy) as new:
        assert roundtrip(new, b"again") == b"again"
    # The connections the blackhole killed stay dead, and still open.
    assert_hangs(old)
    assert_hangs(during)
    assert echo.closed_by_peer <= 1  # only `new` may have been closed yet
    old.close()
    during.close()


def test_the_target_side_hangs_too_unless_closed(echo):
    with BlackholeProxy("127.0.0.1", echo.port) as proxy:
        kept = connect(proxy)
        assert roundtrip(kept, b"x") == b"x"
        proxy.blackhole()
        time.sleep(HANG_SECONDS)
        assert echo.closed_by_peer == 0  # a partition: the server's session lives on
        proxy.resume()

        severed = connect(proxy)
        assert roundtrip(severed, b"y") == b"y"
        proxy.blackhole(close_upstream=True)
        deadline = time.monotonic() + 5
        while echo.closed_by_peer < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        # A failover: the server's sessions end (both of them), the clients still hang.
        assert echo.closed_by_peer == 2
        assert_hangs(severed)
        assert_hangs(kept)
        kept.close()
        severed.close()


def test_close_ends_every_connection(echo):
    proxy = BlackholeProxy("127.0.0.1", echo.port)
    sock = connect(proxy)
    proxy.blackhole()
    proxy.close()
    assert sock.recv(1) == b""  # EOF (not a hang) once the proxy is gone
    sock.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1)


def test_a_refused_target_is_refused_through_the_proxy():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        nobody = probe.getsockname()[1]  # free once closed: nothing listens there
    with BlackholeProxy("127.0.0.1", nobody) as proxy, connect(proxy) as sock:
        assert sock.recv(1) == b""
