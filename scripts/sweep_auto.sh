#!/usr/bin/env bash
# Sweeps auto mode's two thresholds, one at a time, with the other at its default:
#   [uring] auto_up_reads   (full-buffer reads before a direction moves to splice; default 4)
#   [uring] auto_down_pumps (small splices before it moves back to copy; default 8)
# over the workloads where the switch matters (bulk1, bulk8, rr64, rr16k), each value one
# scripts/bench.sh run of `direct` and `uring-auto` (so every figure has its own direct
# connection to be divided by), and prints one table of × direct per value.
#
#   scripts/sweep_auto.sh [--up "1 2 4 8 16"] [--down "2 4 8 16 32"] [--rounds 2]
#                         [--duration 3s] [--out DIR]
#
# Load generator, backends and relay share this machine's cores: read the ratios.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ups="1 2 4 8 16" downs="2 4 8 16 32" rounds=2 duration=3s out=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --up) ups=$2; shift ;;
        --down) downs=$2; shift ;;
        --rounds) rounds=$2; shift ;;
        --duration) duration=$2; shift ;;
        --out) out=$2; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "sweep_auto.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
out=${out:-results/sweep-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$out"
workloads="bulk1 bulk8 rr64 rr16k"

run() { # label uring-keys
    scripts/bench.sh --only "direct uring-auto" --workloads "$workloads" --rounds "$rounds" \
        --duration "$duration" --uring "$2" --out "$out/$1" >"$out/$1.log" 2>&1 \
        || { echo "sweep_auto.sh: $1 failed: $(tail -3 "$out/$1.log")" >&2; exit 1; }
    echo "  $1 done"
}

echo "== auto_up_reads (auto_down_pumps = 8)"
for u in $ups; do run "up$u" "auto_up_reads = $u; auto_down_pumps = 8"; done
echo "== auto_down_pumps (auto_up_reads = 4)"
for d in $downs; do run "down$d" "auto_up_reads = 4; auto_down_pumps = $d"; done

python3 - "$out" $workloads <<'EOF'
import csv, sys, pathlib
out, workloads = pathlib.Path(sys.argv[1]), sys.argv[2:]
rows = []
for d in sorted(p for p in out.iterdir() if p.is_dir()):
    ratios = {}
    with open(d / "summary.csv") as f:
        table = list(csv.DictReader(f))
    for w in workloads:
        ratios[w] = next((float(r["x_direct"]) for r in table
                          if r["workload"] == w and r["variant"] == "uring-auto"), float("nan"))
    rows.append((d.name, ratios))
key = lambda n: (n[0].rstrip("0123456789"), int(n[0].lstrip("updown")))
lines = ["| setting | " + " | ".join(f"{w} × direct" for w in workloads) + " |",
         "|---|" + "---|" * len(workloads)]
for name, r in sorted(rows, key=key):
    label = ("auto_up_reads = " if name.startswith("up") else "auto_down_pumps = ") + name.lstrip("updown")
    lines.append(f"| {label} | " + " | ".join(f"{r[w]:.3f}" for w in workloads) + " |")
text = "\n".join(lines)
(out / "sweep.md").write_text(text + "\n")
print(text)
EOF
echo "results in $out (sweep.md, one bench.sh folder per setting)"
