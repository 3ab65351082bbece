#!/usr/bin/env python3
"""Drive the PyPI `etcd3gw` client (etcd's HTTP/JSON grpc-gateway API) against an endpoint.

    etcd3gw_scenario.py --endpoint http://127.0.0.1:2379 [--venv DIR]

etcd3gw lives in a venv (--venv, else $NEIGHBOURS_VENV, else
~/.cache/concord-neighbours-venv); the script creates it and pip-installs etcd3gw when
missing, then re-executes itself with the venv's interpreter.

Prints `ok <name>` or `FAIL <name>: <why>` per check, then `N checks, F failed`; exits 1
when any check failed (2 on setup errors). Every network call has a timeout and every
wait polls against a deadline.
"""
import argparse
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse
import uuid

DEFAULT_VENV = os.path.join(os.path.expanduser("~"), ".cache", "concord-neighbours-venv")
HTTP_TIMEOUT = 10  # seconds, every unary request
WATCH_READ_TIMEOUT = 60  # seconds of silence before a watch stream read gives up
EVENT_WAIT = 10  # seconds to wait for one watch event


# --------------------------------------------------------------------------- venv bootstrap

def _venv_python(venv):
    return os.path.join(venv, "bin", "python")


def ensure_venv_and_reexec(venv):
    venv = os.path.abspath(venv)
    if os.path.realpath(sys.prefix) == os.path.realpath(venv):
        return  # already running inside it
    py = _venv_python(venv)
    if not os.path.exists(py):
        base = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
        print("creating venv %s" % venv, flush=True)
        subprocess.run([base, "-m", "venv", venv], check=True, timeout=300)
    probe = subprocess.run([py, "-c", "import etcd3gw"], capture_output=True, timeout=60)
    if probe.returncode != 0:
        print("pip install etcd3gw into %s" % venv, flush=True)
        subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "etcd3gw"],
                       check=True, timeout=600)
    os.execv(py, [py, os.path.abspath(__file__)] + sys.argv[1:])


# --------------------------------------------------------------------------- check runner

class Runner:
    def __init__(self):
        self.total = 0
        self.failed = 0

    def check(self, name, fn):
        """Run fn(); an exception or a false result is a failure. Returns fn's value or None."""
        self.total += 1
        try:
            res = fn()
        except AssertionError as e:
            self.failed += 1
            print("FAIL %s: %s" % (name, e or "assertion failed"), flush=True)
            return None
        except Exception as e:  # noqa: BLE001 - report anything the client raised
            self.failed += 1
            why = "%s: %s" % (type(e).__name__, e)
            tb = traceback.extract_tb(e.__traceback__)
            if tb:
                why += " (at %s:%d)" % (os.path.basename(tb[-1].filename), tb[-1].lineno)
            print("FAIL %s: %s" % (name, why.replace("\n", " ")[:600]), flush=True)
            return None
        print("ok %s" % name, flush=True)
        return res


def eq(actual, expected, what=""):
    assert actual == expected, "%sexpected %r, got %r" % (what + ": " if what else "", expected, actual)


def poll(fn, deadline_s, interval=0.2, what="condition"):
    """Call fn until it returns truthy or the deadline passes; returns the last value."""
    end = time.monotonic() + deadline_s
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() >= end:
            raise AssertionError("timed out after %.1fs waiting for %s (last %r)" % (deadline_s, what, v))
        time.sleep(interval)


# --------------------------------------------------------------------------- scenario

def run(endpoint):
    import requests
    from etcd3gw.client import Etcd3Client

    class TimeoutSession(requests.Session):
        """etcd3gw's Watcher posts with no timeout at all; give every request a bound."""

        def request(self, method, url, **kw):
            if kw.get("timeout") is None:
                kw["timeout"] = (5, WATCH_READ_TIMEOUT if kw.get("stream") else HTTP_TIMEOUT)
            return super().request(method, url, **kw)

    u = urllib.parse.urlparse(endpoint)
    host, port, proto = u.hostname, u.port or (443 if u.scheme == "https" else 2379), u.scheme or "http"

    def new_client():
        return Etcd3Client(host=host, port=port, protocol=proto, timeout=HTTP_TIMEOUT,
                           session=TimeoutSession())

    c = new_client()
    r = Runner()
    root = "/neighbours/etcd3gw/%s/" % uuid.uuid4().hex[:12]

    def k(s):
        return root + s

    # ---- discovery / cluster
    def t_discovery():
        path = c.api_path
        print("# api_path=%s" % path, flush=True)
        assert path in ("/v3/", "/v3beta/", "/v3alpha/"), path
        eq(path, "/v3/", "api path for an etcd >= 3.4 /version")
    r.check("version_discovery", t_discovery)

    def t_status():
        st = c.status()
        assert "version" in st and st["version"], "no version in status: %r" % st
        assert "header" in st, "no header in status: %r" % st
    r.check("maintenance_status", t_status)

    def t_members():
        ms = c.members()
        assert ms, "empty member list"
        urls = [x for m in ms for x in m.get("clientURLs", [])]
        assert urls, "no clientURLs in members: %r" % ms
    r.check("member_list", t_members)

    # ---- put / get
    def t_put_get():
        assert c.put(k("a"), "va") is True
        eq(c.get(k("a")), [b"va"])
    r.check("put_get", t_put_get)

    def t_get_metadata():
        c.put(k("a"), "va2")
        [(val, meta)] = c.get(k("a"), metadata=True)
        eq(val, b"va2")
        eq(meta["key"], k("a").encode())
        eq(int(meta["version"]), 2, "version after 2 puts")
        assert int(meta["mod_revision"]) > int(meta["create_revision"]) > 0, meta
    r.check("get_metadata", t_get_metadata)

    r.check("get_missing", lambda: eq(c.get(k("nope")), []))

    def t_get_prefix():
        for name, v in (("p/2", "v2"), ("p/1", "v1"), ("p/3", "v3"), ("q", "outside")):
            c.put(k(name), v)
        got = c.get_prefix(k("p/"), sort_order="ascend", sort_target="key")
        eq([(v, m["key"]) for v, m in got],
           [(b"v1", k("p/1").encode()), (b"v2", k("p/2").encode()), (b"v3", k("p/3").encode())])
        desc = c.get_prefix(k("p/"), sort_order="descend", sort_target="key")
        eq([m["key"] for _, m in desc], [k("p/3").encode(), k("p/2").encode(), k("p/1").encode()])
    r.check("get_prefix", t_get_prefix)

    def t_get_limit_count():
        got = c.get(k("p/"), range_end=_incr(k("p/")), limit=2, sort_order="ascend", sort_target="key")
        eq(got, [b"v1", b"v2"], "limit=2")
        raw = c.post(c.get_url("/kv/range"), json={"key": _b64(k("p/")), "range_end": _b64(_incr(k("p/"))),
                                                 "count_only": True})
        eq(int(raw.get("count", 0)), 3, "count_only count")
        assert "kvs" not in raw, "count_only returned kvs: %r" % raw
    r.check("get_limit_count_only", t_get_limit_count)

    # ---- delete
    def t_delete():
        eq(c.delete(k("a")), True, "delete existing")
        eq(c.get(k("a")), [])
        eq(c.delete(k("a")), False, "delete missing (no 'deleted' field)")
    r.check("delete", t_delete)

    def t_delete_prefix():
        eq(c.delete_prefix(k("p/")), True)
        eq(c.get_prefix(k("p/")), [])
        eq(c.get(k("q")), [b"outside"], "key outside prefix survives")
    r.check("delete_prefix", t_delete_prefix)

    # ---- transactions
    def t_create_replace():
        eq(c.create(k("t/c"), "1"), True, "create new")
        eq(c.create(k("t/c"), "2"), False, "create existing")
        eq(c.replace(k("t/c"), "1", "2"), True, "replace matching")
        eq(c.replace(k("t/c"), "1", "3"), False, "replace stale")
        eq(c.get(k("t/c")), [b"2"])
    r.check("txn_create_replace", t_create_replace)

    def t_txn_value_success():
        key = _b64(k("t/v"))
        c.put(k("t/v"), "x")
        res = c.transaction({
            "compare": [{"key": key, "result": "EQUAL", "target": "VALUE", "value": _b64("x")}],
            "success": [{"request_put": {"key": key, "value": _b64("y")}},
                        {"request_range": {"key": key}}],
            "failure": [{"request_put": {"key": key, "value": _b64("WRONG")}}],
        })
        eq(res.get("succeeded"), True, "succeeded")
        resps = res.get("responses", [])
        eq(len(resps), 2, "responses count")
        assert "response_put" in resps[0], resps[0]
        kvs = resps[1]["response_range"]["kvs"]
        eq(_unb64(kvs[0]["value"]), b"y", "range inside txn sees the put")
        eq(c.get(k("t/v")), [b"y"])
    r.check("txn_compare_value_success", t_txn_value_success)

    def t_txn_version_failure():
        key = _b64(k("t/v"))  # version is 2 now
        res = c.transaction({
            "compare": [{"key": key, "result": "EQUAL", "target": "VERSION", "version": 7}],
            "success": [{"request_put": {"key": key, "value": _b64("WRONG")}}],
            "failure": [{"request_range": {"key": key}},
                        {"request_put": {"key": _b64(k("t/f")), "value": _b64("failure-ran")}}],
        })
        assert not res.get("succeeded", False), "txn should have failed: %r" % res
        resps = res.get("responses", [])
        eq(len(resps), 2, "failure responses count")
        kv = resps[0]["response_range"]["kvs"][0]
        eq(_unb64(kv["value"]), b"y")
        eq(int(kv["version"]), 2, "version reported in failure branch")
        eq(c.get(k("t/f")), [b"failure-ran"])
        eq(c.get(k("t/v")), [b"y"], "success branch must not run")
    r.check("txn_compare_version_failure", t_txn_version_failure)

    def t_txn_version_success():
        key = _b64(k("t/v"))
        res = c.transaction({
            "compare": [{"key": key, "result": "EQUAL", "target": "VERSION", "version": 2},
                        {"key": key, "result": "GREATER", "target": "MOD", "mod_revision": 1}],
            "success": [{"request_delete_range": {"key": key, "prev_kv": True}}],
            "failure": [],
        })
        eq(res.get("succeeded"), True, "succeeded")
        dr = res["responses"][0]["response_delete_range"]
        eq(int(dr.get("deleted", 0)), 1, "deleted")
        eq(_unb64(dr["prev_kvs"][0]["value"]), b"y", "prev_kv")
        eq(c.get(k("t/v")), [])
    r.check("txn_compare_version_mod_success", t_txn_version_success)

    # ---- watch
    def consume(it):
        q = queue.Queue()

        def loop():
            try:
                for ev in it:
                    q.put(ev)
            except Exception as e:  # noqa: BLE001
                q.put(e)
            q.put(StopIteration())
        t = threading.Thread(target=loop, daemon=True)
        t.start()
        return q, t

    def next_event(q, what):
        try:
            ev = q.get(timeout=EVENT_WAIT)
        except queue.Empty:
            raise AssertionError("no watch event within %ds (%s)" % (EVENT_WAIT, what))
        if isinstance(ev, BaseException):
            raise AssertionError("watch stream ended (%s): %r" % (what, ev))
        return ev

    def t_watch_key():
        key = k("w/key")
        it, cancel = c.watch(key)
        q, t = consume(it)
        try:
            c.put(k("w/other"), "noise")
            c.put(key, "1")
            c.put(key, "2")
            c.delete(key)
            e1, e2, e3 = (next_event(q, "event %d" % i) for i in (1, 2, 3))
            eq((e1.get("type", "PUT"), e1["kv"]["key"], e1["kv"]["value"]), ("PUT", key.encode(), b"1"))
            eq((e2.get("type", "PUT"), e2["kv"]["value"]), ("PUT", b"2"))
            eq(int(e2["kv"]["version"]), 2, "version in event")
            eq((e3.get("type"), e3["kv"]["key"]), ("DELETE", key.encode()))
            assert int(e3["kv"]["mod_revision"]) > int(e2["kv"]["mod_revision"]), (e2, e3)
        finally:
            cancel()
        t.join(EVENT_WAIT)
        assert not t.is_alive(), "watch iterator did not stop after cancel"
        # after cancel the iterator is finished; puts must not resurrect it
        c.put(key, "after-cancel")
        while not q.empty():
            ev = q.get_nowait()
            assert isinstance(ev, BaseException), "event after cancel: %r" % ev
    r.check("watch_key_put_put_delete_cancel", t_watch_key)

    def t_watch_prefix():
        pre = k("wp/")
        it, cancel = c.watch_prefix(pre)
        q, t = consume(it)
        try:
            c.put(k("wq/outside"), "x")
            c.put(pre + "a", "1")
            c.put(pre + "b", "2")
            c.delete_prefix(pre)
            evs = [next_event(q, "prefix event %d" % i) for i in range(4)]
            got = [(e.get("type", "PUT"), e["kv"]["key"]) for e in evs]
            eq(got, [("PUT", (pre + "a").encode()), ("PUT", (pre + "b").encode()),
                     ("DELETE", (pre + "a").encode()), ("DELETE", (pre + "b").encode())])
            eq(evs[2]["kv"]["mod_revision"], evs[3]["kv"]["mod_revision"],
               "both deletes of one delete_prefix share a revision")
        finally:
            cancel()
        t.join(EVENT_WAIT)
        assert not t.is_alive(), "watch_prefix iterator did not stop after cancel"
    r.check("watch_prefix", t_watch_prefix)

    def t_watch_start_revision():
        key = k("w/hist")
        c.put(key, "h1")
        [(_, m)] = c.get(key, metadata=True)
        rev = int(m["mod_revision"])
        c.put(key, "h2")
        it, cancel = c.watch(key, start_revision=rev, prev_kv=True)
        q, t = consume(it)
        try:
            e1 = next_event(q, "historic 1")
            e2 = next_event(q, "historic 2")
            eq((e1["kv"]["value"], e2["kv"]["value"]), (b"h1", b"h2"))
            eq(_unb64(e2["prev_kv"]["value"]), b"h1", "prev_kv in event")
        finally:
            cancel()
        t.join(EVENT_WAIT)
    r.check("watch_start_revision_prev_kv", t_watch_start_revision)

    def t_watch_many_quick():
        # several events in a burst: each must arrive as its own parseable message
        pre = k("wb/")
        it, cancel = c.watch_prefix(pre)
        q, t = consume(it)
        try:
            for i in range(20):
                c.put(pre + "%02d" % i, str(i))
            vals = [next_event(q, "burst %d" % i)["kv"]["value"] for i in range(20)]
            eq(vals, [str(i).encode() for i in range(20)])
        finally:
            cancel()
        t.join(EVENT_WAIT)
    r.check("watch_burst_20", t_watch_many_quick)

    # ---- leases
    state = {}

    def t_lease_grant_ttl():
        lease = c.lease(ttl=30)
        state["lease"] = lease
        assert lease.id > 0, lease.id
        ttl = lease.ttl()
        assert 20 <= ttl <= 30, "ttl %r not in [20,30]" % ttl
    r.check("lease_grant_ttl", t_lease_grant_ttl)

    def t_lease_keys():
        lease = state["lease"]
        c.put(k("l/1"), "a", lease=lease)
        c.put(k("l/2"), "b", lease=lease)
        eq(sorted(lease.keys()), [k("l/1").encode(), k("l/2").encode()])
        [(_, m)] = c.get(k("l/1"), metadata=True)
        eq(int(m["lease"]), lease.id, "lease id on kv")
    r.check("lease_attach_keys", t_lease_keys)

    def t_lease_refresh():
        ttl = state["lease"].refresh()
        assert 25 <= ttl <= 30, "refresh ttl %r" % ttl
    r.check("lease_refresh", t_lease_refresh)

    def t_lease_revoke():
        lease = state["lease"]
        assert lease.revoke() is True
        poll(lambda: c.get(k("l/1")) == [] and c.get(k("l/2")) == [], 10, what="leased keys deleted")
        eq(lease.ttl(), -1, "ttl of a revoked lease")
        eq(lease.refresh(), -1, "keepalive of a revoked lease")
    r.check("lease_revoke_deletes_keys", t_lease_revoke)

    def t_lease_expiry():
        lease = c.lease(ttl=3)
        c.put(k("l/exp"), "e", lease=lease)
        eq(c.get(k("l/exp")), [b"e"])
        t0 = time.monotonic()
        poll(lambda: c.get(k("l/exp")) == [], 20, interval=0.25, what="key of an expired lease gone")
        took = time.monotonic() - t0
        assert took >= 1.0, "key vanished after %.2fs, before its 3s lease could expire" % took
        eq(lease.ttl(), -1, "ttl of an expired lease")
    r.check("lease_expiry", t_lease_expiry)

    # ---- locks
    def t_lock():
        name = "lk-" + uuid.uuid4().hex[:8]
        l1 = c.lock(name, ttl=30)
        l2 = c.lock(name, ttl=30)
        eq(l1.acquire(), True, "first acquire")
        eq(l1.is_acquired(), True, "is_acquired")
        eq(l2.acquire(), False, "second acquire while held")
        eq(l2.is_acquired(), False, "second is_acquired")
        l2.lease.revoke()
        assert 20 <= l1.refresh() <= 30, "lock refresh ttl"
        eq(l2.release(), False, "release by non-holder")
        eq(l1.is_acquired(), True, "still held after foreign release")
        eq(l1.release(), True, "release")
        eq(l1.is_acquired(), False, "not held after release")
        eq(l2.acquire(), True, "acquire after release")
        eq(l2.release(), True, "second release")
        l1.lease.revoke()
        l2.lease.revoke()
        with c.lock(name, ttl=30) as l3:
            eq(l3.is_acquired(), True, "context manager holds the lock")
        eq(l3.is_acquired(), False, "context manager released")
        l3.lease.revoke()
    r.check("lock_acquire_contend_release", t_lock)

    def t_lock_expiry():
        name = "lk-" + uuid.uuid4().hex[:8]
        l1 = c.lock(name, ttl=3)
        eq(l1.acquire(), True)
        l2 = c.lock(name, ttl=30)

        def try_acquire():
            if l2.acquire():
                return True
            l2.lease.revoke()
            return False
        t0 = time.monotonic()
        poll(try_acquire, 20, interval=0.5, what="lock freed by the holder's expired lease")
        assert time.monotonic() - t0 >= 1.0, "lock freed too early"
        eq(l2.release(), True)
        l2.lease.revoke()
    r.check("lock_freed_by_lease_expiry", t_lock_expiry)

    # ---- cleanup
    def t_cleanup():
        c.delete_prefix(root)
        eq(c.get_prefix(root), [])
    r.check("cleanup", t_cleanup)
    return r


def _b64(s):
    import base64
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _unb64(s):
    import base64
    return base64.b64decode(s)


def _incr(s):
    b = bytearray(s.encode())
    b[-1] += 1
    return bytes(b).decode()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint", required=True, help="http://HOST:PORT of an etcd-compatible server")
    ap.add_argument("--venv", default=os.environ.get("NEIGHBOURS_VENV") or DEFAULT_VENV)
    a = ap.parse_args()
    try:
        ensure_venv_and_reexec(a.venv)
    except Exception as e:  # noqa: BLE001
        print("setup failed: %s" % e, flush=True)
        return 2
    try:
        r = run(a.endpoint.rstrip("/"))
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        print("FAIL scenario: %s" % e)
        print("1 checks, 1 failed")
        return 1
    print("%d checks, %d failed" % (r.total, r.failed), flush=True)
    # etcd3gw's watch threads are non-daemon executor workers; don't wait for them
    sys.stdout.flush()
    os._exit(1 if r.failed else 0)


if __name__ == "__main__":
    sys.exit(main())
