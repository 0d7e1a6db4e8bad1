"""Network probes run inside namespaces by the netns tests (`nsenter --net=… python probe.py`):
a TCP server that reports each client's address, a TCP client, a UDP listener and sender."""

from __future__ import annotations

import socket
import sys
import time


def serve_tcp(host: str, port: int) -> int:
    with socket.create_server((host, port), reuse_port=True) as server:
        print("ready", flush=True)
        while True:
            conn, peer = server.accept()
            with conn, conn.makefile("rw") as stream:
                stream.write(f"peer={peer[0]}\n")
                stream.flush()
                for line in stream:
                    stream.write(line)
                    stream.flush()


def connect_tcp(host: str, port: int, timeout_s: float) -> int:
    """Connect, read the greeting, then three round trips on the one connection."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as conn, \
                conn.makefile("rw") as stream:
            greeting = stream.readline().strip()
            for n in range(3):
                stream.write(f"ping{n}\n")
                stream.flush()
                if stream.readline().strip() != f"ping{n}":
                    print("echo mismatch", flush=True)
                    return 3
            print(greeting, flush=True)
            return 0
    except OSError as exc:
        print(f"error={type(exc).__name__}:{exc}", flush=True)
        return 1


def serve_udp(host: str, port: int, window_s: float) -> int:
    """Print the source of every datagram received within the window."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, port))
        print("ready", flush=True)
        deadline = time.monotonic() + window_s
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, peer = sock.recvfrom(256)
            except TimeoutError:
                break
            print(f"from={peer[0]} data={data.decode()}", flush=True)
    return 0


def send_udp(host: str, port: int, count: int, tag: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(count):
            try:
                sock.sendto(tag.encode(), (host, port))
            except OSError as exc:  # ENETUNREACH, EPERM from a reject: the packet is gone
                print(f"error={exc}", flush=True)
            time.sleep(0.02)  # spacing the burst, not waiting for anything
    return 0


def main(argv: list[str]) -> int:
    cmd, host, port = argv[0], argv[1], int(argv[2])
    if cmd == "serve-tcp":
        return serve_tcp(host, port)
    if cmd == "connect-tcp":
        return connect_tcp(host, port, float(argv[3]))
    if cmd == "serve-udp":
        return serve_udp(host, port, float(argv[3]))
    if cmd == "send-udp":
        return send_udp(host, port, int(argv[3]), argv[4])
    print(f"unknown probe {cmd}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
