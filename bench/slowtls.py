"""A TLS front for the emulator whose handshake takes as long as one across the internet.

eSMS is reached over HTTPS: before a request's first byte can leave, a new connection costs a
TCP handshake and a TLS handshake, two or three round trips (60 ms at a 30 ms round trip). On
loopback the emulator answers a connection at once, which hides what a slow connection does to
a rate slot. This front accepts TLS connections, waits `delay` seconds before it answers the
client's hello (the round trips), and then relays the plain bytes both ways to the emulator.

    python bench/slowtls.py --upstream 127.0.0.1:8080 --delay-ms 60 --port 8443 --dir /tmp/tls

It writes a self-signed certificate for 127.0.0.1 into `--dir` (`cert.pem`: point the worker's
SSL_CERT_FILE at it) and prints "listening <port>" once it accepts connections.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for IP 127.0.0.1 and its key (openssl, as Debian ships it)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def _pipe(source: socket.socket, target: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            target.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _relay(client: socket.socket, upstream: tuple[str, int], delay: float, context) -> None:
    time.sleep(delay)  # the round trips of the handshake
    try:
        secure = context.wrap_socket(client, server_side=True)
        plain = socket.create_connection(upstream)
    except OSError:
        client.close()
        return
    threading.Thread(target=_pipe, args=(plain, secure), daemon=True).start()
    _pipe(secure, plain)


def serve(port: int, upstream: tuple[str, int], delay: float, context: ssl.SSLContext) -> None:
    """One thread per connection: the front carries a handful of keep-alive connections."""
    listener = socket.create_server(("127.0.0.1", port), backlog=128)
    print(f"listening {listener.getsockname()[1]}", flush=True)
    while True:
        client, _ = listener.accept()
        relay = threading.Thread(target=_relay, args=(client, upstream, delay, context))
        relay.daemon = True
        relay.start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="host:port of the plain emulator")
    parser.add_argument("--delay-ms", type=float, default=60.0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--dir", required=True, help="where to write cert.pem and key.pem")
    args = parser.parse_args()
    cert, key = make_certificate(Path(args.dir))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    host, port = args.upstream.rsplit(":", 1)
    serve(args.port, (host, int(port)), args.delay_ms / 1000, context)


if __name__ == "__main__":
    main()
