"""A small threaded loopback TCP proxy for fault injection between the service and a broker.

    proxy = NetProxy(broker_port).start()   # listens on proxy.port
    proxy.blackhole()    # stop forwarding in both directions; sockets stay open (a cut cable)
    proxy.resume()       # forward again (and accept new connections again after sever())
    proxy.throttle(500)  # at most ~500 bytes/s per direction per connection; 0 = unlimited
    proxy.sever()        # close every connection and refuse new ones until resume()
    proxy.reset_at_disconnect()  # the broker's DISCONNECT and close become a TCP reset
    proxy.refuse_client("id")    # close that client id's connections, and each new one at its
                                 # CONNECT (a broker that turns one client away, before CONNACK)
    proxy.stop()         # close everything; also runs at `max_lifetime` (self-stopping)

Bounded: at most `max_connections` live connections, every thread polls with a short timeout
and ends when the proxy stops, and the proxy stops itself after `max_lifetime` seconds.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
import time

POLL = 0.05
CHUNK = 16384


class NetProxy:
    def __init__(
        self,
        target_port: int,
        target_host: str = "127.0.0.1",
        *,
        max_connections: int = 256,
        max_lifetime: float = 300.0,
    ) -> None:
        self.target = (target_host, target_port)
        self.max_connections = max_connections
        self.max_lifetime = max_lifetime
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(POLL)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._threads: list[threading.Thread] = []
        self._stopped = threading.Event()
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._refusing = False
        self._rate = 0.0  # bytes per second per direction; 0 = unlimited
        self._reset_at_disconnect = False
        self._refused_ids: set[str] = set()
        self._client_ids: dict[socket.socket, str] = {}  # a client's socket -> its CONNECT's id
        self.accepted = 0

    # ---- control ----------------------------------------------------------------------------
    def start(self) -> NetProxy:
        self._spawn(self._accept_loop, "netproxy-accept")
        return self

    def blackhole(self) -> None:
        """Stop moving bytes either way, without closing anything: TCP sees no FIN or RST."""
        self._forwarding.clear()

    def resume(self) -> None:
        self._refusing = False
        self._forwarding.set()

    def throttle(self, bytes_per_sec: float) -> None:
        self._rate = max(0.0, float(bytes_per_sec))

    def reset_at_disconnect(self) -> None:
        """From the broker, forward whole MQTT packets; when the broker sends a DISCONNECT or
        ends the connection, reset the client's connection (an RST, no FIN) and forward
        nothing more. A broker that closes with the client's bytes unread resets the
        connection itself, and the reset can overtake its DISCONNECT; here it always does."""
        self._reset_at_disconnect = True

    def refuse_client(self, client_id: str) -> None:
        """Close the connections of `client_id`, and from now on each new one of it as soon as
        its CONNECT arrives: the client sees a close before CONNACK. Other clients go on."""
        with self._lock:
            self._refused_ids.add(client_id)
            doomed = [(a, b) for a, b in self._pairs if self._client_ids.get(a) == client_id]
        for a, b in doomed:
            _close(a)
            _close(b)

    def sever(self) -> None:
        """Close every open connection (the peers see a close) and refuse new ones."""
        self._refusing = True
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            _close(a)
            _close(b)

    def connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def stop(self) -> None:
        self._stopped.set()
        self._forwarding.set()  # unblock pumps so they notice the stop
        self.sever()
        _close(self._listener)
        for t in list(self._threads):
            if t is not threading.current_thread():
                t.join(5)

    # ---- threads ----------------------------------------------------------------------------
    def _spawn(self, target: object, name: str, *args: object) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)  # type: ignore[arg-type]
        self._threads = [x for x in self._threads if x.is_alive()]
        self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        deadline = time.monotonic() + self.max_lifetime
        while not self._stopped.is_set():
            if time.monotonic() > deadline:
                threading.Thread(target=self.stop, daemon=True).start()
                return
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._refusing or self.connections() >= self.max_connections:
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)
                continue
            self.accepted += 1
            with self._lock:
                self._pairs.append((client, upstream))
            self._spawn(self._pump, "netproxy-pump", client, upstream)

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        """Move bytes both ways between a (the client) and b (the broker) until either closes
        or the proxy stops."""
        for s in (a, b):
            s.setblocking(False)
        sel = selectors.DefaultSelector()
        try:
            sel.register(a, selectors.EVENT_READ)
            sel.register(b, selectors.EVENT_READ)
        except (ValueError, OSError):
            return
        budget_at = {a: time.monotonic(), b: time.monotonic()}
        from_broker = bytearray()  # an incomplete packet, after reset_at_disconnect()
        try:
            while not self._stopped.is_set() and a.fileno() >= 0 and b.fileno() >= 0:
                if not self._forwarding.is_set():
                    self._forwarding.wait(POLL)  # hold the bytes in the kernel buffers
                    continue
                for key, _ in sel.select(POLL):
                    if not self._forwarding.is_set():
                        # blackhole() came while select() waited: bytes written after it must
                        # stay in the kernel buffers, not slip through on this wake-up.
                        break
                    src = key.fileobj
                    assert isinstance(src, socket.socket)
                    data = self._read(src, budget_at)
                    if data is not None and not self._forward(src, a, b, data, from_broker):
                        return
        finally:
            sel.close()
            _close(a)
            _close(b)
            with self._lock:
                self._pairs = [p for p in self._pairs if p != (a, b)]
                self._client_ids.pop(a, None)

    def _read(self, src: socket.socket, budget_at: dict[socket.socket, float]) -> bytes | None:
        """What `src` has, within the throttle's budget for its direction: None when nothing
        is to be read now, b"" when it closed."""
        size = CHUNK
        rate = self._rate
        if rate:
            now = time.monotonic()
            if budget_at[src] > now:
                return None  # this direction has spent its budget; wait
            size = max(1, min(CHUNK, int(rate * POLL)))
            budget_at[src] = now + size / rate
        try:
            return src.recv(size)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def _forward(
        self,
        src: socket.socket,
        client: socket.socket,
        broker: socket.socket,
        data: bytes,
        from_broker: bytearray,
    ) -> bool:
        """Pass `data` from `src` to the other side; False once the connection is over."""
        if src is broker and self._reset_at_disconnect:
            return not self._from_broker(client, from_broker, data)
        if src is client and client not in self._client_ids and data:
            return self._first_from_client(client, broker, data)
        return bool(data) and self._send_all(client if src is broker else broker, data)

    def _from_broker(self, client: socket.socket, pending: bytearray, data: bytes) -> bool:
        """After reset_at_disconnect(): forward the whole packets; True once the client's
        connection is reset because the broker sent a DISCONNECT or ended (`data` empty)."""
        pending += data
        whole, disconnect = _whole_packets(pending)
        self._send_all(client, whole)
        if data and not disconnect:
            return False
        _reset(client)
        return True

    def _first_from_client(self, client: socket.socket, broker: socket.socket, data: bytes) -> bool:
        """The client's first bytes, which hold its CONNECT (one small packet, read whole on
        loopback): note its client id; False (the connection ends) if that id is refused."""
        client_id = connect_client_id(data)
        with self._lock:
            self._client_ids[client] = client_id
            refused = client_id in self._refused_ids
        return not refused and self._send_all(broker, data)

    def _send_all(self, dst: socket.socket, data: bytes) -> bool:
        view = memoryview(data)
        while view and not self._stopped.is_set():
            try:
                sent = dst.send(view)
            except BlockingIOError:
                self._stopped.wait(0.005)  # back-pressure: the peer's buffer is full
                continue
            except OSError:
                return False
            view = view[sent:]
        return True


def _whole_packets(buffer: bytearray) -> tuple[bytes, bool]:
    """Take the complete MQTT packets off the front of `buffer`, up to a DISCONNECT; returns
    them and whether a DISCONNECT came next (which stays in `buffer`, never forwarded)."""
    done = 0
    disconnect = False
    while done < len(buffer):
        if buffer[done] >> 4 == 14:  # DISCONNECT
            disconnect = True
            break
        end = packet_end(buffer, done)
        if end is None:
            break
        done = end
    whole = bytes(buffer[:done])
    del buffer[:done]
    return whole, disconnect


def connect_client_id(data: bytes) -> str:
    """The client id of the CONNECT packet at the start of `data` (MQTT 3.1.1 or 5); "" when
    `data` holds no whole CONNECT."""
    end = packet_end(data, 0)
    if not data or data[0] >> 4 != 1 or end is None:
        return ""
    pos = 1
    while data[pos] & 0x80:  # the fixed header's remaining length
        pos += 1
    pos += 1
    name_length = int.from_bytes(data[pos : pos + 2], "big")
    pos += 2 + name_length
    level = data[pos]
    pos += 4  # level, flags, keepalive
    if level == 5:  # the CONNECT's properties: their length, a variable byte integer
        size, shift = 0, 0
        while True:
            byte = data[pos]
            pos += 1
            size |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        pos += size
    id_length = int.from_bytes(data[pos : pos + 2], "big")
    return data[pos + 2 : pos + 2 + id_length].decode("utf-8", "replace")


def packet_end(buffer: bytes | bytearray, start: int) -> int | None:
    """Where the MQTT packet at `start` ends, or None while it is incomplete."""
    size, pos = 0, start + 1
    for shift in (0, 7, 14, 21):  # the remaining length: up to four bytes, 7 bits each
        if pos >= len(buffer):
            return None
        byte = buffer[pos]
        pos += 1
        size |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return pos + size if pos + size <= len(buffer) else None
    raise ValueError(f"malformed remaining length at byte {start}")


def _reset(s: socket.socket) -> None:
    """Close with an RST: SO_LINGER on, with a zero timeout."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    _close(s)


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.close()
