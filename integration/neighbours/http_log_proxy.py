#!/usr/bin/env python3
"""Transparent TCP proxy that logs the HTTP traffic between a client and an etcd endpoint.

Test helper for the neighbour scenarios: it shows which grpc-gateway paths a third-party
client really calls and what the JSON bodies look like, so Concord can serve the same.
Bytes are forwarded unchanged in both directions (HTTP chunk boundaries are preserved,
which matters for etcd3gw's watch parser), and each direction of each connection is
appended to the log as it passes.

    http_log_proxy.py serve --listen 127.0.0.1:24790 --upstream 127.0.0.1:24791 \
        --log /tmp/traffic.log [--max-seconds 3600]
    http_log_proxy.py summarize /tmp/traffic.log     # distinct "METHOD PATH" lines with counts

Tip for clients that discover members (Patroni): start etcd with
--advertise-client-urls pointing at the proxy so the member list sends them back here.
"""
import argparse
import collections
import re
import socket
import sys
import threading
import time

_lock = threading.Lock()


def _log(fh, conn_id, direction, data):
    with _lock:
        fh.write("=== conn=%d %s t=%.3f len=%d\n" % (conn_id, direction, time.time(), len(data)))
        fh.write(data.decode("utf-8", "replace"))
        fh.write("\n")
        fh.flush()


def _pump(src, dst, fh, conn_id, direction):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            _log(fh, conn_id, direction, data)
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (dst, src):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(listen, upstream, log_path, max_seconds):
    lhost, lport = listen.rsplit(":", 1)
    uhost, uport = upstream.rsplit(":", 1)
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((lhost, int(lport)))
    srv.listen(128)
    srv.settimeout(1.0)
    fh = open(log_path, "a", encoding="utf-8")
    deadline = time.monotonic() + max_seconds
    conn_id = 0
    print("proxy %s -> %s logging to %s" % (listen, upstream, log_path), flush=True)
    while time.monotonic() < deadline:
        try:
            client, _ = srv.accept()
        except socket.timeout:
            continue
        conn_id += 1
        try:
            up = socket.create_connection((uhost, int(uport)), timeout=5)
            up.settimeout(None)
        except OSError as e:
            _log(fh, conn_id, "ERR", str(e).encode())
            client.close()
            continue
        for a, b, d in ((client, up, "C>S"), (up, client, "S>C")):
            threading.Thread(target=_pump, args=(a, b, fh, conn_id, d), daemon=True).start()
    srv.close()


REQ_RE = re.compile(r"^(GET|POST|PUT|DELETE|HEAD|OPTIONS|PATCH) (\S+) HTTP/1\.[01]\r?$", re.M)


UA_RE = re.compile(r"^user-agent: *(\S+)", re.I | re.M)


def summarize(log_path):
    """Print distinct "METHOD PATH" lines with counts, grouped by the client's User-Agent."""
    counts = collections.Counter()
    ua_of_conn = {}
    pending = []  # (conn, request line) before the conn's User-Agent was seen
    with open(log_path, encoding="utf-8", errors="replace") as fh:
        cur_dir = cur_conn = None
        for line in fh:
            if line.startswith("=== conn="):
                parts = line.split()
                cur_conn, cur_dir = int(parts[1].split("=")[1]), parts[2]
                continue
            if cur_dir != "C>S":
                continue
            m = REQ_RE.match(line.rstrip("\n"))
            if m:
                pending.append((cur_conn, "%s %s" % (m.group(1), m.group(2))))
            u = UA_RE.match(line.rstrip("\r\n"))
            if u:
                ua_of_conn[cur_conn] = u.group(1).split("/")[0]
    for conn, req in pending:
        counts[(ua_of_conn.get(conn, "?"), req)] += 1
    for ua, req in sorted(counts):
        print("%-16s %6d  %s" % (ua, counts[(ua, req)], req))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--listen", required=True)
    s.add_argument("--upstream", required=True)
    s.add_argument("--log", required=True)
    s.add_argument("--max-seconds", type=float, default=3600)
    m = sub.add_parser("summarize")
    m.add_argument("log")
    a = ap.parse_args()
    if a.cmd == "serve":
        serve(a.listen, a.upstream, a.log, a.max_seconds)
    else:
        summarize(a.log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
