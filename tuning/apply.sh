#!/usr/bin/env bash
# Apply (or check) an orbitmq tuning profile on this host.
#   tuning/apply.sh PROFILE            apply: prints every change it makes
#   tuning/apply.sh PROFILE --check    report what is not set; changes nothing; exit 1 if any
# PROFILE is a name under tuning/profiles/ (dev, nvme-dedicated) or a path to a .conf file.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
prof="${1:?usage: apply.sh PROFILE [--check]}"
mode="${2:-apply}"
[ -f "$prof" ] || prof="$here/profiles/$prof.conf"
[ -f "$prof" ] || { echo "no such profile: $1" >&2; exit 2; }

val() { sed -n "s/^[[:space:]]*$1[[:space:]]*=[[:space:]]*//p" "$prof" | tail -n 1; }
missing=0
note() { echo "$*"; }

# sysctls
while IFS='=' read -r key want; do
  key="$(echo "${key#sysctl.}" | xargs)"; want="$(echo "$want" | xargs)"
  have="$(sysctl -n "$key" 2>/dev/null || echo '?')"
  if [ "$have" = "$want" ]; then
    note "ok      $key = $have"
  elif [ "$mode" = "--check" ]; then
    note "NOT SET $key = $have (profile wants $want)"; missing=1
  else
    sysctl -q -w "$key=$want" && note "changed $key: $have -> $want" || { note "FAILED  $key -> $want"; missing=1; }
  fi
done < <(grep -E '^[[:space:]]*sysctl\.' "$prof")

# interrupts: move NVMe and network IRQs to irq_cores
irq="$(val irq_cores)"
if [ -n "$irq" ]; then
  for d in /proc/irq/[0-9]*; do
    n="$(basename "$d")"
    grep -qE 'nvme|virtio|eth|ens|enp|mlx' "$d"/* 2>/dev/null || grep -qE "^ *$n:.*(nvme|virtio|eth|ens|enp|mlx)" /proc/interrupts || continue
    have="$(cat "$d/smp_affinity_list" 2>/dev/null || echo '?')"
    if [ "$have" = "$irq" ]; then note "ok      irq $n on cores $have"
    elif [ "$mode" = "--check" ]; then note "NOT SET irq $n on cores $have (profile wants $irq)"; missing=1
    else echo "$irq" > "$d/smp_affinity_list" 2>/dev/null && note "changed irq $n: cores $have -> $irq" || note "skipped irq $n (kernel-managed)"
    fi
  done
fi

# locked memory: a limit of the service, reported only
want_ml="$(val limit.memlock_kib)"
if [ -n "$want_ml" ]; then
  have_ml="$(ulimit -l)"
  if [ "$have_ml" = unlimited ] || { [ "$have_ml" != unlimited ] && [ "$have_ml" -ge "$want_ml" ]; }; then
    note "ok      memlock $have_ml KiB"
  else
    note "NOT SET memlock is $have_ml KiB, profile wants $want_ml KiB: set LimitMEMLOCK=${want_ml}K in the unit or 'ulimit -l $want_ml'"
    missing=1
  fi
fi

shard="$(val shard_cores)"
note "shards run on cores: ${shard:-all online cores} (pin=$(val pin)); start with: orbitmq standalone --profile $(basename "$prof" .conf)"
[ "$mode" = "--check" ] && exit "$missing"
exit 0
