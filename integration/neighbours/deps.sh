#!/usr/bin/env bash
# Installs what the neighbour scenarios need (integration/neighbours/*.py) on Debian 12:
#   patroni (Debian 3.0.2; its etcd3 DCS talks to the grpc-gateway with urllib3 but imports
#            python3-etcd and python3-dnspython, which the package pulls in, as it does
#            python3-psycopg2, python3-urllib3, python3-yaml, python3-psutil...)
#   postgresql-15 (server binaries in /usr/lib/postgresql/15/bin, pg_rewind included)
#   python3-venv (the etcd3gw scenario pip-installs etcd3gw into a venv)
# Then makes sure no system PostgreSQL cluster or system etcd the packages auto-started
# is running or will start again. Idempotent; does nothing slow when all is there.
# Run as root (or with sudo available).
set -euo pipefail
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

need=()
dpkg -s patroni >/dev/null 2>&1 || need+=(patroni)
dpkg -s postgresql-15 >/dev/null 2>&1 || need+=(postgresql-15)
[ -x /usr/lib/postgresql/15/bin/pg_rewind ] || { [[ " ${need[*]-} " == *" postgresql-15 "* ]] || need+=(postgresql-15); }
/usr/bin/python3 -c 'import psycopg2, etcd, dns.resolver, urllib3, yaml' >/dev/null 2>&1 \
  || need+=(python3-psycopg2 python3-etcd python3-dnspython python3-urllib3 python3-yaml)
/usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)

if [ ${#need[@]} -gt 0 ]; then
  echo "neighbours deps: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Keep the packages' maintainer scripts from starting services during the install.
  policy_created=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
    $sudo chmod 755 /usr/sbin/policy-rc.d
    policy_created=1
  fi
  # Wait (bounded) for another apt/dpkg run to finish.
  for _ in $(seq 1 90); do
    pgrep -x apt-get >/dev/null 2>&1 || pgrep -x dpkg >/dev/null 2>&1 || pgrep -x apt >/dev/null 2>&1 || break
    sleep 10
  done
  if ! $sudo apt-get install -y -qq "${need[@]}" </dev/null; then
    $sudo apt-get update -qq </dev/null
    $sudo apt-get install -y -qq "${need[@]}" </dev/null
  fi
  [ "$policy_created" -eq 0 ] || $sudo rm -f /usr/sbin/policy-rc.d
fi

# Debian's postgresql-common creates a "main" cluster on 5432 and starts it; the scenarios
# run their own clusters, so stop every system cluster and keep it from auto-starting.
if command -v pg_lsclusters >/dev/null 2>&1; then
  pg_lsclusters --no-header 2>/dev/null | while read -r ver name port status _rest; do
    [ -n "${ver:-}" ] || continue
    conf="/etc/postgresql/$ver/$name/start.conf"
    if [ -f "$conf" ] && ! grep -qx 'manual' "$conf"; then
      echo manual | $sudo tee "$conf" >/dev/null
    fi
    case "$status" in
      online*) echo "neighbours deps: stopping system postgres cluster $ver/$name (port $port)"
               $sudo pg_ctlcluster --force "$ver" "$name" stop || true ;;
    esac
  done
fi
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  for unit in postgresql patroni etcd; do
    if systemctl is-enabled --quiet "$unit" 2>/dev/null; then $sudo systemctl disable --quiet "$unit" || true; fi
    if systemctl is-active --quiet "$unit" 2>/dev/null; then $sudo systemctl stop "$unit" || true; fi
  done
fi
# Without systemd, a sysvinit-started etcd (Debian's etcd-server) would show up as a
# process owned by the etcd user on the default port.
if pgrep -u etcd -x etcd >/dev/null 2>&1; then
  echo "neighbours deps: stopping system etcd"
  if [ -x /etc/init.d/etcd ]; then $sudo /etc/init.d/etcd stop || true; fi
fi
exit 0
