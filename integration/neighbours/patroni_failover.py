#!/usr/bin/env python3
"""Two-node PostgreSQL 15 HA pair under Debian's Patroni, using an etcd3 DCS endpoint.

    patroni_failover.py --endpoint http://127.0.0.1:2379 --workdir DIR [--ttl 10 --loop-wait 2]

Run as root (deps: integration/neighbours/deps.sh). PostgreSQL and Patroni run as the
`postgres` OS user on free loopback ports. Phases:

  1. start both Patroni processes; wait until one is leader and the other streams from it
  2. create a table + row on the leader, see it on the replica
  3. kill -9 the leader's Patroni, its postmaster and the postmaster's children
  4. time until the replica is leader (Patroni REST) and out of recovery (SQL);
     assert <= ttl + loop_wait + 20 s
  5. restart the old node's Patroni; wait until it streams from the new leader
     (pg_rewind, or a re-clone if Patroni chooses) and has a row written after failover

The last line on success is `failover_seconds=<float> rejoin_seconds=<float>`. Exits
non-zero on any failure, after printing the tail of every Patroni and PostgreSQL log.
Every process started (and every process whose cwd or command line lies in the workdir,
which catches postgres children) is killed by pid on exit. Every wait has a deadline.
"""
import argparse
import atexit
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

PG_BIN = "/usr/lib/postgresql/15/bin"
PATRONI = shutil.which("patroni") or "/usr/bin/patroni"
PG_USER = "postgres"
SU_PASS = "nb-su-" + uuid.uuid4().hex[:8]
REPL_PASS = "nb-repl-" + uuid.uuid4().hex[:8]
REWIND_PASS = "nb-rw-" + uuid.uuid4().hex[:8]
LEADER_ROLES = ("master", "primary")  # Patroni 3.0 says "master", later versions "primary"

T0 = time.monotonic()


def say(msg):
    print("[%7.2fs] %s" % (time.monotonic() - T0, msg), flush=True)


class Failure(Exception):
    pass


def free_port():
    """A free loopback port below the kernel's ephemeral range (32768-60999), picked at
    random: a port from bind(0) can be taken meanwhile as the source port of another
    test's outgoing connection (postgres then found its port in use for minutes)."""
    import random
    for _ in range(200):
        port = random.randint(20000, 32767)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            s.close()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_for(fn, timeout, what, interval=0.25):
    """Poll fn() until truthy; raise Failure after timeout. Returns (value, seconds)."""
    start = time.monotonic()
    last_err = None
    while True:
        try:
            v = fn()
            if v:
                return v, time.monotonic() - start
        except (Failure, SystemExitFailure):
            raise
        except Exception as e:  # noqa: BLE001 - keep polling, remember why
            last_err = e
        if time.monotonic() - start >= timeout:
            raise Failure("timed out after %.0fs waiting for %s%s" % (
                timeout, what, " (last error: %s)" % last_err if last_err else ""))
        time.sleep(interval)


# --------------------------------------------------------------------------- processes

def _proc_pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _ppid(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            data = f.read()
        return int(data[data.rindex(")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _descendants(roots):
    roots = set(roots)
    children = {}
    for p in _proc_pids():
        pp = _ppid(p)
        if pp is not None:
            children.setdefault(pp, []).append(p)
    out, stack = set(), list(roots)
    while stack:
        p = stack.pop()
        for c in children.get(p, []):
            if c not in out:
                out.add(c)
                stack.append(c)
    return out


def _pids_in_dir(d):
    """Processes whose cwd is inside d or whose command line mentions d (ours by construction)."""
    d = os.path.realpath(d)
    out = set()
    me = os.getpid()
    for p in _proc_pids():
        if p == me:
            continue
        try:
            cwd = os.readlink("/proc/%d/cwd" % p)
        except OSError:
            cwd = ""
        try:
            with open("/proc/%d/cmdline" % p, "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            cmd = ""
        if cwd == d or cwd.startswith(d + "/") or (d + "/") in cmd:
            out.add(p)
    return out


def _alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


def kill_pids(pids, sig=signal.SIGKILL):
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
        except OSError as e:
            say("kill %d: %s" % (p, e))


def postmaster_pid(data_dir):
    try:
        with open(os.path.join(data_dir, "postmaster.pid")) as f:
            pid = int(f.readline().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


# --------------------------------------------------------------------------- node

class Node:
    def __init__(self, name, workdir, scope, namespace, etcd_hostport, protocol, ttl, loop_wait):
        self.name = name
        self.dir = os.path.join(workdir, name)
        self.data_dir = os.path.join(self.dir, "data")
        self.log_dir = os.path.join(self.dir, "log")
        self.pg_log_dir = os.path.join(self.dir, "pglog")
        self.config = os.path.join(self.dir, "patroni.yml")
        self.stdout_path = os.path.join(self.dir, "patroni.stdout")
        self.pg_port = free_port()
        self.api_port = free_port()
        self.scope, self.namespace = scope, namespace
        self.etcd_hostport, self.protocol = etcd_hostport, protocol
        self.ttl, self.loop_wait = ttl, loop_wait
        self.proc = None
        self.started = []  # every Patroni Popen we made

    def write_config(self):
        retry_timeout = max(1, (self.ttl - self.loop_wait) // 2)
        sock_dir = self.dir if len(self.dir) < 90 else ""
        cfg = {
            "scope": self.scope,
            "namespace": self.namespace,
            "name": self.name,
            "log": {"dir": self.log_dir, "level": "INFO", "file_num": 2, "file_size": 50 * 1024 * 1024},
            "restapi": {"listen": "127.0.0.1:%d" % self.api_port,
                        "connect_address": "127.0.0.1:%d" % self.api_port},
            "etcd3": {"hosts": self.etcd_hostport, "protocol": self.protocol},
            "bootstrap": {
                "dcs": {
                    "ttl": self.ttl,
                    "loop_wait": self.loop_wait,
                    "retry_timeout": retry_timeout,
                    "maximum_lag_on_failover": 1048576,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "use_slots": True,
                        "remove_data_directory_on_rewind_failure": True,
                        "remove_data_directory_on_diverged_timelines": True,
                        "parameters": {
                            "wal_level": "replica",
                            "hot_standby": "on",
                            "wal_log_hints": "on",
                            "max_wal_senders": 10,
                            "max_replication_slots": 10,
                            "wal_keep_size": "128MB",
                            "max_connections": 50,
                        },
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, "data-checksums"],
                "pg_hba": [
                    "local all all trust",
                    "host replication replicator 127.0.0.1/32 scram-sha-256",
                    "host all all 127.0.0.1/32 scram-sha-256",
                ],
            },
            "postgresql": {
                "listen": "127.0.0.1:%d" % self.pg_port,
                "connect_address": "127.0.0.1:%d" % self.pg_port,
                "data_dir": self.data_dir,
                "bin_dir": PG_BIN,
                "pgpass": os.path.join(self.dir, "pgpass"),
                "authentication": {
                    "superuser": {"username": "postgres", "password": SU_PASS},
                    "replication": {"username": "replicator", "password": REPL_PASS},
                    "rewind": {"username": "rewind_user", "password": REWIND_PASS},
                },
                "parameters": {
                    "unix_socket_directories": sock_dir,
                    "shared_buffers": "32MB",
                    "logging_collector": "on",
                    "log_directory": self.pg_log_dir,
                    "log_filename": "postgresql.log",
                    "log_file_mode": "0644",
                    "log_line_prefix": "%m [%p] ",
                },
            },
            "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False, "nosync": False},
        }
        # JSON is valid YAML; no PyYAML needed here.
        with open(self.config, "w") as f:
            json.dump(cfg, f, indent=2)

    def prepare(self, pw):
        for d in (self.dir, self.log_dir, self.pg_log_dir):
            os.makedirs(d, exist_ok=True)
            os.chown(d, pw.pw_uid, pw.pw_gid)
            os.chmod(d, 0o700)
        self.write_config()
        os.chown(self.config, pw.pw_uid, pw.pw_gid)
        os.chmod(self.config, 0o600)

    def start(self, pw):
        env = {
            "PATH": "%s:/usr/local/bin:/usr/bin:/bin" % PG_BIN,
            "HOME": pw.pw_dir,
            "USER": PG_USER,
            "LOGNAME": PG_USER,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
        }
        out = open(self.stdout_path, "ab")
        os.chown(self.stdout_path, pw.pw_uid, pw.pw_gid)
        # Popen(user=...) drops to postgres like `runuser -u postgres --` but execs patroni
        # directly, so self.proc.pid is Patroni's own pid (runuser would fork and wait).
        self.proc = subprocess.Popen(
            ["/usr/bin/python3", PATRONI, self.config],
            cwd=self.dir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            user=pw.pw_uid, group=pw.pw_gid, extra_groups=[], start_new_session=True)
        out.close()
        self.started.append(self.proc)
        say("%s: patroni pid %d (pg 127.0.0.1:%d, rest 127.0.0.1:%d)" % (
            self.name, self.proc.pid, self.pg_port, self.api_port))

    def patroni_alive(self):
        return self.proc is not None and self.proc.poll() is None

    # ---- observation
    def rest(self, path, timeout=3):
        url = "http://127.0.0.1:%d%s" % (self.api_port, path)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return json.loads(r.read().decode())
        except urllib.error.HTTPError as e:  # /patroni is 200, but / answers 503 on replicas
            return json.loads(e.read().decode() or "{}")

    def sql(self, query, timeout=15):
        env = dict(os.environ, PGPASSWORD=SU_PASS, PGCONNECT_TIMEOUT="5")
        r = subprocess.run(
            [os.path.join(PG_BIN, "psql"), "-X", "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", "postgres",
             "-d", "postgres", "-At", "-v", "ON_ERROR_STOP=1", "-c", query],
            env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise RuntimeError("psql on %s: %s" % (self.name, r.stderr.strip()))
        return r.stdout.strip()

    def role(self):
        try:
            st = self.rest("/patroni")
        except Exception:  # noqa: BLE001
            return None, None
        return st.get("role"), st.get("state")

    def is_leader(self):
        role, state = self.role()
        return role in LEADER_ROLES and state == "running" and self.sql("select pg_is_in_recovery()") == "f"

    def is_replica_running(self):
        role, state = self.role()
        return role == "replica" and state in ("running", "streaming") \
            and self.sql("select pg_is_in_recovery()") == "t"

    def streaming_to(self, other):
        rows = self.sql("select application_name, state from pg_stat_replication")
        return ("%s|streaming" % other.name) in rows.splitlines()

    # ---- destruction
    def crash(self):
        """kill -9 Patroni, the postmaster and all their children, as a machine crash would."""
        pm = postmaster_pid(self.data_dir)
        roots = [p for p in (self.proc.pid if self.proc else None, pm) if p]
        victims = set(roots) | _descendants(roots)
        say("%s: kill -9 patroni=%s postmaster=%s (+%d children)" % (
            self.name, self.proc.pid if self.proc else None, pm, len(victims) - len(roots)))
        kill_pids(sorted(victims))
        if self.proc:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                raise Failure("%s: patroni pid %d survived SIGKILL" % (self.name, self.proc.pid))
        wait_for(lambda: not any(_alive(p) for p in victims), 15, "%s's killed processes to exit" % self.name)
        # A zombie postmaster still "exists" for Patroni's psutil checks on restart; wait
        # (bounded) for PID 1 to reap them, but don't fail the run on a slow reaper.
        try:
            wait_for(lambda: not any(os.path.exists("/proc/%d" % p) for p in victims), 15,
                     "%s's killed processes to be reaped" % self.name)
        except Failure as e:
            say("warning: %s" % e)
        return pm

    def log_tails(self, lines=60):
        out = []
        paths = [self.stdout_path]
        for d in (self.log_dir, self.pg_log_dir):
            if os.path.isdir(d):
                paths += sorted(os.path.join(d, f) for f in os.listdir(d))
        for p in paths:
            if not os.path.isfile(p):
                continue
            try:
                with open(p, "rb") as f:
                    f.seek(0, 2)
                    size = f.tell()
                    f.seek(max(0, size - 64 * 1024))
                    tail = f.read().decode("utf-8", "replace").splitlines()[-lines:]
            except OSError as e:
                tail = ["<unreadable: %s>" % e]
            out.append("----- tail of %s -----\n%s" % (p, "\n".join(tail)))
        return "\n".join(out)


# --------------------------------------------------------------------------- cleanup

class Cleanup:
    def __init__(self, workdir):
        self.workdir = workdir
        self.nodes = []
        self.done = False

    def __call__(self, *_):
        if self.done:
            return
        self.done = True
        pids = set()
        for n in self.nodes:
            for p in n.started:
                if p.poll() is None:
                    pids.add(p.pid)
            pm = postmaster_pid(n.data_dir)
            if pm:
                pids.add(pm)
        pids |= _descendants(pids)
        pids |= _pids_in_dir(self.workdir)
        if pids:
            say("cleanup: kill -9 %s" % " ".join(map(str, sorted(pids))))
            kill_pids(pids)
        for n in self.nodes:
            for p in n.started:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    say("cleanup: patroni pid %d did not exit" % p.pid)
        end = time.monotonic() + 20
        while time.monotonic() < end:
            left = [p for p in (pids | _pids_in_dir(self.workdir)) if _alive(p)]
            if not left:
                break
            kill_pids(left)
            time.sleep(0.2)
        else:
            say("cleanup: WARNING processes still alive: %s" % left)


def dcs_cleanup(endpoint, prefix):
    """Best effort: drop the cluster's keys from the DCS (grpc-gateway deleterange)."""
    import base64
    try:
        with urllib.request.urlopen(endpoint + "/version", timeout=5) as r:
            ver = json.loads(r.read().decode()).get("etcdcluster", "3.4.0")
        major_minor = tuple(int(x) for x in ver.split(".")[:2])
        api = "/v3" if major_minor >= (3, 4) else "/v3beta"
        end = bytearray(prefix.encode())
        end[-1] += 1
        body = json.dumps({"key": base64.b64encode(prefix.encode()).decode(),
                           "range_end": base64.b64encode(bytes(end)).decode()}).encode()
        req = urllib.request.Request(endpoint + api + "/kv/deleterange", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            r.read()
    except Exception as e:  # noqa: BLE001
        say("dcs cleanup failed (ignored): %s" % e)


# --------------------------------------------------------------------------- scenario

def scenario(args, nodes, endpoint):
    n1, n2 = nodes
    boot_timeout = args.boot_timeout

    say("phase 1: start both Patroni nodes")
    n1.start(args.pw)
    n2.start(args.pw)

    def pair_ready():
        for n in nodes:
            if not n.patroni_alive():
                raise Failure("%s: patroni exited with code %s" % (n.name, n.proc.returncode))
        for lead, rep in ((n1, n2), (n2, n1)):
            try:
                if lead.is_leader() and rep.is_replica_running() and lead.streaming_to(rep):
                    return lead, rep
            except (RuntimeError, subprocess.TimeoutExpired):
                continue
        return None

    (leader, replica), took = wait_for(pair_ready, boot_timeout, "a leader + streaming replica")
    say("phase 1 ok: leader=%s replica=%s streaming after %.1fs" % (leader.name, replica.name, took))
    cluster = leader.rest("/cluster")
    say("cluster: %s" % json.dumps([{k: m.get(k) for k in ("name", "role", "state", "timeline")}
                                    for m in cluster.get("members", [])]))
    roles = sorted(m.get("role") for m in cluster.get("members", []))
    if roles != ["leader", "replica"]:
        raise Failure("/cluster roles %r, expected leader+replica" % roles)

    say("phase 2: write on the leader, read on the replica")
    leader.sql("create table nb_check(id int primary key, note text);"
               "insert into nb_check values (1, 'before-failover')")
    _, took = wait_for(lambda: replica.sql("select note from nb_check where id = 1") == "before-failover",
                       30, "row 1 on the replica")
    say("phase 2 ok: row replicated in %.2fs" % took)

    say("phase 3: crash the leader %s" % leader.name)
    old_tl = leader.rest("/patroni").get("timeline")
    t_kill = time.monotonic()
    leader.crash()

    say("phase 4: wait for %s to be promoted" % replica.name)
    limit = args.ttl + args.loop_wait + 20
    wait_for(replica.is_leader, limit + 5, "promotion of %s" % replica.name, interval=0.1)
    failover = time.monotonic() - t_kill
    new_tl = replica.rest("/patroni").get("timeline")
    say("phase 4: %s is leader, out of recovery, %.2fs after the kill (timeline %s -> %s)" % (
        replica.name, failover, old_tl, new_tl))
    if failover > limit:
        raise Failure("failover took %.2fs > ttl+loop_wait+20 = %ds" % (failover, limit))
    if replica.sql("select note from nb_check where id = 1") != "before-failover":
        raise Failure("row 1 lost in failover")
    replica.sql("insert into nb_check values (2, 'after-failover')")
    new_leader, old_leader = replica, leader

    say("phase 5: restart %s's Patroni and wait for it to rejoin" % old_leader.name)
    t_restart = time.monotonic()
    old_leader.start(args.pw)

    def rejoined():
        if not old_leader.patroni_alive():
            raise SystemExitFailure("%s: restarted patroni exited with code %s" % (
                old_leader.name, old_leader.proc.returncode))
        try:
            return (old_leader.is_replica_running() and new_leader.streaming_to(old_leader)
                    and old_leader.sql("select note from nb_check where id = 2") == "after-failover")
        except (RuntimeError, subprocess.TimeoutExpired):
            return False
    wait_for(rejoined, args.rejoin_timeout, "%s to stream from %s" % (old_leader.name, new_leader.name))
    rejoin = time.monotonic() - t_restart
    st = old_leader.rest("/patroni")
    say("phase 5 ok: %s is a streaming replica of %s after %.2fs (timeline %s)" % (
        old_leader.name, new_leader.name, rejoin, st.get("timeline")))
    how = "pg_rewind" if _log_mentions(old_leader, "rewind") else "re-clone/replica start"
    if _log_mentions(old_leader, "reinitializ") or _log_mentions(old_leader, "removing data directory"):
        how = "reinitialize (re-clone)"
    say("rejoin method per Patroni log: %s" % how)
    cluster = new_leader.rest("/cluster")
    say("cluster: %s" % json.dumps([{k: m.get(k) for k in ("name", "role", "state", "timeline")}
                                    for m in cluster.get("members", [])]))
    return failover, rejoin


class SystemExitFailure(Exception):
    """A failure that must stop polling at once (not retried by wait_for)."""


def _log_mentions(node, word):
    try:
        for f in os.listdir(node.log_dir):
            with open(os.path.join(node.log_dir, f), errors="replace") as fh:
                if word.lower() in fh.read().lower():
                    return True
    except OSError:
        pass
    return False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint", required=True, help="http://HOST:PORT of the etcd-compatible DCS")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--ttl", type=int, default=10)
    ap.add_argument("--loop-wait", type=int, default=2)
    ap.add_argument("--boot-timeout", type=float, default=180)
    ap.add_argument("--rejoin-timeout", type=float, default=180)
    args = ap.parse_args()

    if os.geteuid() != 0:
        print("must run as root (postgres runs as the %s user)" % PG_USER)
        return 2
    for p in (PATRONI, os.path.join(PG_BIN, "postgres"), os.path.join(PG_BIN, "psql")):
        if not os.path.exists(p):
            print("missing %s; run integration/neighbours/deps.sh" % p)
            return 2
    args.pw = pwd.getpwnam(PG_USER)
    endpoint = args.endpoint.rstrip("/")
    u = urllib.parse.urlparse(endpoint)
    hostport = "%s:%d" % (u.hostname, u.port or 2379)

    try:
        with urllib.request.urlopen(endpoint + "/version", timeout=5) as r:
            say("DCS /version: %s" % r.read().decode().strip())
    except Exception as e:  # noqa: BLE001
        print("FAIL setup: %s/version unreachable: %s" % (endpoint, e))
        return 2

    workdir = os.path.realpath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    # No PR_SET_CHILD_SUBREAPER here on purpose: postmasters that Patroni detaches would
    # become our children, and once killed their zombies look alive to Patroni (psutil),
    # which then waits forever for a "running" postmaster to stop.
    cleanup = Cleanup(workdir)
    atexit.register(cleanup)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, f: sys.exit(128 + s))

    # stale leftovers of an earlier run in the same workdir
    stale = _pids_in_dir(workdir)
    if stale:
        say("killing stale processes from an earlier run: %s" % sorted(stale))
        kill_pids(stale)
        wait_for(lambda: not any(_alive(p) for p in stale), 15, "stale processes to exit")
    for name in ("node1", "node2"):
        shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
    os.chown(workdir, args.pw.pw_uid, args.pw.pw_gid)
    os.chmod(workdir, 0o755)
    probe = subprocess.run(["runuser", "-u", PG_USER, "--", "test", "-w", workdir], timeout=10)
    if probe.returncode != 0:
        print("FAIL setup: %s is not writable by %s (is a parent directory closed, e.g. /root?)"
              % (workdir, PG_USER))
        return 2

    scope = "nb-" + uuid.uuid4().hex[:10]
    namespace = "/concord-neighbours/"
    nodes = [Node(n, workdir, scope, namespace, hostport, u.scheme or "http", args.ttl, args.loop_wait)
             for n in ("node1", "node2")]
    cleanup.nodes = nodes
    for n in nodes:
        n.prepare(args.pw)
    say("patroni %s, scope %s%s, DCS etcd3 %s://%s, ttl=%d loop_wait=%d, workdir %s" % (
        subprocess.run(["/usr/bin/python3", PATRONI, "--version"], capture_output=True, text=True,
                       timeout=30).stdout.strip(), namespace, scope, u.scheme or "http", hostport,
        args.ttl, args.loop_wait, workdir))

    ok = False
    try:
        failover, rejoin = scenario(args, nodes, endpoint)
        ok = True
    except (Failure, SystemExitFailure, RuntimeError, subprocess.TimeoutExpired) as e:
        say("FAIL: %s" % e)
    except Exception as e:  # noqa: BLE001
        import traceback
        traceback.print_exc()
        say("FAIL: unexpected %s: %s" % (type(e).__name__, e))
    finally:
        if not ok:
            for n in nodes:
                print(n.log_tails(), flush=True)
        cleanup()
        dcs_cleanup(endpoint, namespace + scope + "/")
    if not ok:
        return 1
    print("failover_seconds=%.2f rejoin_seconds=%.2f" % (failover, rejoin), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
