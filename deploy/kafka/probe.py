"""Readiness probe for the loopback Kafka broker started by deploy/kafka.sh.

Sends one Metadata (v1) request over a plain socket and succeeds only when the answer lists the
expected broker at the expected address and names an active controller: a listening port alone does
not mean the broker has registered with the KRaft controller and can serve produce requests.
Standard library only, so it runs before any project dependency is installed.

usage: python3 probe.py HOST PORT NODE_ID
"""

import socket
import struct
import sys

METADATA_API_KEY = 3
METADATA_API_VERSION = 1
CORRELATION_ID = 1
CLIENT_ID = b"gateway-deploy-probe"
TIMEOUT_S = 2.0
RESPONSE_BYTES_MAX = 1 << 20


def read_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        chunks += chunk
    return bytes(chunks)


def metadata_brokers(host: str, port: int) -> tuple[list[tuple[int, str, int]], int]:
    # An empty topic array (count 0) asks for cluster metadata without any topic, so nothing is created.
    request = struct.pack(">hhih", METADATA_API_KEY, METADATA_API_VERSION, CORRELATION_ID, len(CLIENT_ID))
    request += CLIENT_ID + struct.pack(">i", 0)
    with socket.create_connection((host, port), timeout=TIMEOUT_S) as sock:
        sock.sendall(struct.pack(">i", len(request)) + request)
        (size,) = struct.unpack(">i", read_exact(sock, 4))
        if not 0 < size <= RESPONSE_BYTES_MAX:
            raise ValueError(f"unexpected response size {size}")
        body = read_exact(sock, size)
    (correlation_id, broker_count) = struct.unpack_from(">ii", body, 0)
    if correlation_id != CORRELATION_ID:
        raise ValueError(f"unexpected correlation id {correlation_id}")
    offset = 8
    brokers = []
    for _ in range(broker_count):
        (node_id, host_len) = struct.unpack_from(">ih", body, offset)
        offset += 6
        broker_host = body[offset : offset + host_len].decode()
        offset += host_len
        (broker_port, rack_len) = struct.unpack_from(">ih", body, offset)
        offset += 6 + max(rack_len, 0)
        brokers.append((node_id, broker_host, broker_port))
    (controller_id,) = struct.unpack_from(">i", body, offset)
    return brokers, controller_id


def main() -> int:
    host, port, node_id = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    try:
        brokers, controller_id = metadata_brokers(host, port)
    except (OSError, ValueError, struct.error) as error:
        print(f"metadata request failed: {error}", file=sys.stderr)
        return 1
    if (node_id, host, port) not in brokers or controller_id < 0:
        print(f"broker not ready: brokers={brokers} controller={controller_id}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
