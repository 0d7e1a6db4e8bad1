"""Network probes run inside namespaces by the netns tests (`nsenter --net=… python probe.py`):
a TCP server that reports each client's address, a TCP client, a UDP listener and sender, a
bulk TCP sink and source, and a sender of hand-made VXLAN frames."""

from __future__ import annotations

import socket
import struct
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


def serve_sink(host: str, port: int, timeout_s: float) -> int:
    """Accept one connection, read it to EOF, print the byte count."""
    with socket.create_server((host, port)) as server:
        print("ready", flush=True)
        server.settimeout(timeout_s)
        conn, _ = server.accept()
        total = 0
        with conn:
            conn.settimeout(timeout_s)
            while chunk := conn.recv(65536):
                total += len(chunk)
        print(f"bytes={total}", flush=True)
    return 0


def send_bytes(host: str, port: int, count: int, timeout_s: float) -> int:
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as conn:
            conn.sendall(b"x" * count)
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)  # EOF once the sink has read everything
    except OSError as exc:
        print(f"error={type(exc).__name__}:{exc}", flush=True)
        return 1
    print("sent", flush=True)
    return 0


def _checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    return int(~(total + (total >> 16)) & 0xFFFF)


def inject_vxlan(underlay: str, port: int, vni: int, dst_mac: str, src_ip: str,
                 dst_ip: str, dport: int, tag: str) -> int:
    """One VXLAN frame carrying a UDP datagram `tag` from src_ip to dst_ip:dport, sent to
    the overlay port of `underlay`, as a host (or an intruder) would."""
    payload = tag.encode()
    udp = struct.pack("!HHHH", 40000, dport, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                         socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    frame = (bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex("02aabbccddee")
             + b"\x08\x00" + header + udp)
    vxlan = struct.pack("!II", 0x08000000, vni << 8)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(5):
            sock.sendto(vxlan + frame, (underlay, port))
            time.sleep(0.02)
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
    if cmd == "serve-sink":
        return serve_sink(host, port, float(argv[3]))
    if cmd == "send-bytes":
        return send_bytes(host, port, int(argv[3]), float(argv[4]))
    if cmd == "inject-vxlan":
        return inject_vxlan(host, port, int(argv[3]), argv[4], argv[5], argv[6],
                            int(argv[7]), argv[8])
    print(f"unknown probe {cmd}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
