"""A TCP proxy for tests whose network path can die silently: `BlackholeProxy`.

    proxy = BlackholeProxy("127.0.0.1", 5432)   # listens on 127.0.0.1:<proxy.port>
    ...                                          # point a client at proxy.port
    proxy.blackhole()                            # the path dies: nothing moves, nothing closes
    proxy.resume()                               # new connections work again
    proxy.close()

A stopped server answers a connection attempt with RST and closes the connections it had: a
client finds out at once. A network path that died (a managed database failing over to another
host, a partition, a firewall that forgot its state) says nothing: the client's connections stay
open, what it sends goes nowhere, no answer, no FIN, no RST ever comes. `blackhole()` does that:

- every connection open at that moment stops forwarding in both directions and stays open; what
  either side sends is read and dropped, so writes succeed and reads wait for ever;
- a connection made during the blackhole is accepted (the listening socket's backlog would accept
  it anyway) and never connected to the target: it hangs the same way;
- `resume()` forwards again for new connections only: a connection that lived through the
  blackhole stays dead, as a TCP connection whose packets were lost for minutes is;
- `blackhole(close_upstream=True)` also closes the proxy's connections to the target, so the
  server sees its sessions end (the old primary is gone with them, as in a failover); by
  default the server's side hangs too (a partition: the server's sessions live on, idle).

What it cannot imitate: the proxy's own kernel still acknowledges every segment, so TCP
keepalives and `tcp_user_timeout` on either side never fire through it. A client that survives
this proxy bounds its waits with deadlines of its own (socket timeouts, task time limits) or
server-side timers (`statement_timeout`, `idle_in_transaction_session_timeout`), which is what a
dropped path in production needs anyway when keepalives are minutes long.

One thread runs a `selectors` loop over non-blocking sockets; `blackhole()`, `resume()` and
`close()` hand their change to that thread and return once it took effect, so no byte is
forwarded after `blackhole()` returns.
"""

from __future__ import annotations

import selectors
import socket
import threading
from dataclasses import dataclass, field

_CHUNK = 65536
# Stop reading from one side while this much waits to be written to the other (backpressure).
_BUFFER_LIMIT = 1 << 20


@dataclass(eq=False)
class _Pipe:
    """One proxied connection: the client's socket, the target's, and what waits to be sent."""

    client: socket.socket
    upstream: socket.socket | None
    dead: bool = False
    # Bytes read from one side, waiting to be written to the other.
    to_upstream: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)
    # The side that sent FIN: once its bytes are written, the other side gets a FIN too.
    client_eof: bool = False
    upstream_eof: bool = False


class BlackholeProxy:
    """Forwards 127.0.0.1:`port` (a free port unless given) to `target_host`:`target_port` until
    `blackhole()`. Also a context manager that closes it."""

    def __init__(
        self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server((host, port), backlog=512)
        self._listener.setblocking(False)
        self.host, self.port = self._listener.getsockname()[:2]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        # Commands from other threads wake the loop through this pair.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._commands: list[tuple[str, dict, threading.Event]] = []
        self._pipes: set[_Pipe] = set()
        self._blackholed = False
        self._close_upstream = False
        self._running = True
        self.connections = 0  # accepted so far, dead ones included
        self._thread = threading.Thread(
            target=self._loop, name=f"blackhole-proxy-{self.port}", daemon=True
        )
        self._thread.start()

    # --- the test's controls --------------------------------------------------------------

    def blackhole(self, *, close_upstream: bool = False) -> None:
        """Kill every open connection silently and accept new ones without forwarding."""
        self._command("blackhole", close_upstream=close_upstream)

    def resume(self) -> None:
        """Forward new connections again; the ones the blackhole killed stay dead."""
        self._command("resume")

    def close(self) -> None:
        """Stop listening and close every socket (clients then see their connections end)."""
        if self._thread.is_alive():
            self._command("close")
            self._thread.join(10)

    @property
    def blackholed(self) -> bool:
        return self._blackholed

    def live_connections(self) -> int:
        """Connections that forward right now."""
        with self._lock:
            return sum(1 for pipe in self._pipes if not pipe.dead)

    def __enter__(self) -> BlackholeProxy:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def _command(self, name: str, **args) -> None:
        done = threading.Event()
        with self._lock:
            self._commands.append((name, args, done))
        self._wake_w.send(b"x")
        if not done.wait(10):
            raise RuntimeError(f"proxy loop did not take {name!r}")

    # --- the loop thread ------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while self._running:
                for key, events in self._selector.select(timeout=1.0):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        self._run_commands()
                    else:
                        self._service(key.data, key.fileobj, events)
        finally:
            self._shutdown()

    def _run_commands(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            commands, self._commands = self._commands, []
        for name, args, done in commands:
            if name == "blackhole":
                self._blackholed = True
                self._close_upstream = args["close_upstream"]
                for pipe in list(self._pipes):
                    self._kill(pipe)
            elif name == "resume":
                self._blackholed = False
            elif name == "close":
                self._running = False
            done.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. EMFILE: leave it in the backlog for the next round
            self.connections += 1
            client.setblocking(False)
            if self._blackholed:
                pipe = _Pipe(client, None, dead=True)
            else:
                try:
                    # Loopback in tests: the connect is immediate, or refused at once.
                    upstream = socket.create_connection(self.target, timeout=5)
                except OSError:
                    client.close()  # the target refused: so does the proxy (RST or FIN)
                    continue
                upstream.setblocking(False)
                upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                pipe = _Pipe(client, upstream)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._pipes.add(pipe)
            self._watch(pipe)

    def _kill(self, pipe: _Pipe) -> None:
        """The path dies: drop what waits, keep reading (and dropping) from both sides."""
        pipe.dead = True
        pipe.to_upstream.clear()
        pipe.to_client.clear()
        if self._close_upstream and pipe.upstream is not None:
            self._forget(pipe.upstream)
            pipe.upstream = None
        self._watch(pipe)

    def _watch(self, pipe: _Pipe) -> None:
        """(Re-)register both sockets for what they wait for now."""
        for sock, incoming_closed, outgoing in (
            (pipe.client, pipe.client_eof, pipe.to_client),
            (pipe.upstream, pipe.upstream_eof, pipe.to_upstream),
        ):
            if sock is None or sock.fileno() < 0:
                continue
            events = 0
            if not incoming_closed and (
                pipe.dead or len(self._peer_buffer(pipe, sock)) < _BUFFER_LIMIT
            ):
                events |= selectors.EVENT_READ
            if outgoing and not pipe.dead:
                events |= selectors.EVENT_WRITE
            try:
                if events:
                    self._selector.modify(sock, events, pipe)
                else:
                    self._selector.unregister(sock)
            except KeyError:
                if events:
                    self._selector.register(sock, events, pipe)

    @staticmethod
    def _peer_buffer(pipe: _Pipe, sock: socket.socket) -> bytearray:
        """The buffer that bytes read from `sock` go into."""
        return pipe.to_upstream if sock is pipe.client else pipe.to_client

    def _service(self, pipe: _Pipe, sock: socket.socket, events: int) -> None:
        if pipe not in self._pipes:
            return
        from_client = sock is pipe.client
        try:
            if events & selectors.EVENT_READ:
                data = sock.recv(_CHUNK)
                if not data:
                    self._eof(pipe, from_client)
                elif not pipe.dead:
                    self._peer_buffer(pipe, sock).extend(data)
                # A dead pipe drops what it reads: the bytes went into a path that lost them.
            if events & selectors.EVENT_WRITE and not pipe.dead:
                outgoing = pipe.to_client if from_client else pipe.to_upstream
                if outgoing:
                    sent = sock.send(outgoing)
                    del outgoing[:sent]
                self._pass_on_eof(pipe)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            if pipe.dead:
                # A side of a dead pipe gave up (reset): stop watching it, say nothing.
                self._forget(sock)
                if from_client:
                    pipe.client_eof = True
                else:
                    pipe.upstream = None
                self._maybe_drop(pipe)
                return
            # A live pipe passes a reset (or any other socket error) on as the end of both
            # sides: the client sees its connection close, as it would without the proxy.
            self._end(pipe)
            return
        if pipe in self._pipes:
            self._watch(pipe)

    def _eof(self, pipe: _Pipe, from_client: bool) -> None:
        if from_client:
            pipe.client_eof = True
        else:
            pipe.upstream_eof = True
        if pipe.dead:
            # A client that gave up on a dead connection closes it; nothing reaches the other
            # side (the path is dead), and the socket is of no more use here.
            if from_client:
                self._forget(pipe.client)
            elif pipe.upstream is not None:
                self._forget(pipe.upstream)
                pipe.upstream = None
            self._maybe_drop(pipe)
        else:
            self._pass_on_eof(pipe)

    def _pass_on_eof(self, pipe: _Pipe) -> None:
        """A side that sent FIN: once its bytes are written, shut the other side's writing."""
        if pipe.client_eof and not pipe.to_upstream and pipe.upstream is not None:
            _shutdown_write(pipe.upstream)
        if pipe.upstream_eof and not pipe.to_client:
            _shutdown_write(pipe.client)
        if pipe.client_eof and pipe.upstream_eof and not pipe.to_client and not pipe.to_upstream:
            self._end(pipe)

    def _maybe_drop(self, pipe: _Pipe) -> None:
        """A dead pipe whose client closed it is gone; its upstream half goes with it."""
        if pipe.client_eof:
            self._end(pipe)

    def _end(self, pipe: _Pipe) -> None:
        with self._lock:
            self._pipes.discard(pipe)
        self._forget(pipe.client)
        if pipe.upstream is not None:
            self._forget(pipe.upstream)

    def _forget(self, sock: socket.socket) -> None:
        if sock.fileno() < 0:
            return
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()

    def _shutdown(self) -> None:
        with self._lock:
            pipes, self._pipes = list(self._pipes), set()
            commands, self._commands = self._commands, []
        for pipe in pipes:
            self._forget(pipe.client)
            if pipe.upstream is not None:
                self._forget(pipe.upstream)
        for sock in (self._listener, self._wake_r):
            self._forget(sock)
        self._selector.close()
        self._wake_w.close()
        for _name, _args, done in commands:
            done.set()


def _shutdown_write(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
