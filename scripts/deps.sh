#!/usr/bin/env bash
# Installs what building and testing Concord needs on a fresh Debian machine:
# libclang (RocksDB's bindgen), protoc (the etcd-client crate's build), and Debian's
# etcd-server / etcd-client (the reference etcd and etcdctl for differential tests),
# curl (the HTTP/JSON differential session), Debian's prometheus (and its promtool:
# the Prometheus and ops/ tests), and the neighbours' own setup.
# Does nothing when everything is already there.
set -euo pipefail
need=()
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
# Key pairs for the JWT auth tests.
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq "${need[@]}" </dev/null
fi
# The real neighbours of the HTTP/JSON API: Patroni with PostgreSQL 15, and a venv
# for Python's etcd3gw.
"$(dirname "$0")/../integration/neighbours/deps.sh"
# Debian's etcd-server package starts a system etcd on :2379; tests use their own
# ports, but a default-port concord would collide with it.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
  systemctl stop etcd || true
fi
# Likewise Debian's prometheus package starts a system Prometheus on :9090 (and its
# node exporter on :9100); tests start their own on free ports.
for unit in prometheus prometheus-node-exporter; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$unit" 2>/dev/null; then
    systemctl stop "$unit" || true
  fi
done
