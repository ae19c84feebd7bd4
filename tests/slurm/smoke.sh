#!/usr/bin/env bash
# Smoke checks for the local test cluster (tests/slurm/cluster.sh up [--nodes 2]).
#   1. srun -n 2 --mpi=pmi2: one COMM_WORLD of size 2 (ranks 0 and 1)
#   2. sbatch --wait: job finishes, sacct shows it COMPLETED
#   3. (needs >= 2 nodes) srun -N 2 -n 4 --mpi=pmi2: size 4 across node1+node2,
#      allreduce gives the right sums; repeated STRESS times (default 5)
# Usage: tests/slurm/smoke.sh [--require-nodes N]   (fail instead of skip check 3)
# Ends with a plain "N passed, N failed" line; exit 1 if anything failed.
set -euo pipefail

PY=${PYTHON:-python}
STRESS=${STRESS:-5}
STEP_TIMEOUT=${STEP_TIMEOUT:-120}   # seconds; a hung MPI launch must not stall CI
REQUIRE_NODES=0
while (($#)); do
    case $1 in
    --require-nodes) REQUIRE_NODES=${2:?}; shift 2 ;;
    *) echo "usage: $0 [--require-nodes N]" >&2; exit 2 ;;
    esac
done

WORK=$(mktemp -d /tmp/slurm-smoke.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
PASSED=0 FAILED=0 SKIPPED=0

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
pass() { PASSED=$((PASSED + 1)); echo "PASS $1 ($(elapsed "$2") s)"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL $1 ($(elapsed "$2") s): $3"; }

# MPI probe: every rank prints "node rank size local_size sum vec_ok".
# local_size = ranks MPICH sees as sharing this (fake) node; sum/vec_ok check
# that a real collective crossed all ranks (a mis-launch gives size-1 singletons).
cat >"$WORK/probe.py" <<'EOF'
import os
from array import array
from mpi4py import MPI

c = MPI.COMM_WORLD
local = c.Split_type(MPI.COMM_TYPE_SHARED)
total = c.allreduce(c.rank + 1)                     # = size*(size+1)/2
n = 1 << 17                                         # 1 MiB of doubles
out = array("d", [0.0]) * n
c.Allreduce(array("d", [float(c.rank)]) * n, out, op=MPI.SUM)
want = float(sum(range(c.size)))
vec_ok = out[0] == want and out[n // 2] == want and out[-1] == want
print(os.environ.get("SLURMD_NODENAME", "?"), c.rank, c.size, local.size,
      total, int(vec_ok), flush=True)
EOF

# check_probe OUTFILE SIZE [NODES...]: validate probe output.
check_probe() {
    "$PY" - "$@" <<'EOF'
import sys
from collections import Counter
path, size, nodes = sys.argv[1], int(sys.argv[2]), set(sys.argv[3:])
rows = [l.split() for l in open(path) if l.strip()]
assert len(rows) == size, f"{len(rows)} lines, want {size}"
ranks = sorted(int(r[1]) for r in rows)
assert ranks == list(range(size)), f"ranks {ranks}"
assert all(int(r[2]) == size for r in rows), "COMM_WORLD size mismatch"
assert all(int(r[4]) == size * (size + 1) // 2 for r in rows), "bad allreduce sum"
assert all(r[5] == "1" for r in rows), "bad vector Allreduce"
per_node = Counter(r[0] for r in rows)
assert all(int(r[3]) == per_node[r[0]] for r in rows), f"COMM_TYPE_SHARED != ranks per node {per_node}"
if nodes:
    assert set(per_node) == nodes, f"nodes {dict(per_node)}, want {sorted(nodes)}"
print("   ", " | ".join(" ".join(r) for r in sorted(rows, key=lambda r: int(r[1]))))
EOF
}

cd "$WORK"
sinfo >/dev/null 2>&1 || { echo "cluster not up (run tests/slurm/cluster.sh up)"; exit 1; }
NNODES=$(sinfo -h -N -o %N | sort -u | wc -l)
echo "cluster: $NNODES node(s): $(sinfo -h -N -o '%N:%T:%c' | sort -u | tr '\n' ' ')"

# --- 1. srun -n 2 ------------------------------------------------------------
t=$(now)
if timeout "$STEP_TIMEOUT" srun -n 2 --mpi=pmi2 "$PY" -c \
    "from mpi4py import MPI; c=MPI.COMM_WORLD; print(c.rank, c.size)" >"$WORK/1.out" 2>"$WORK/1.err" &&
    [[ $(sort "$WORK/1.out" | tr '\n' ';') == "0 2;1 2;" ]] &&
    timeout "$STEP_TIMEOUT" srun -n 2 --mpi=pmi2 "$PY" "$WORK/probe.py" >"$WORK/1b.out" 2>>"$WORK/1.err" &&
    check_probe "$WORK/1b.out" 2; then
    pass "1 srun -n 2 --mpi=pmi2 (size 2)" "$t"
else
    fail "1 srun -n 2 --mpi=pmi2" "$t" "$(cat "$WORK/1.out" "$WORK/1.err" 2>/dev/null | head -n 20)"
fi

# --- 2. sbatch --wait + sacct ------------------------------------------------
t=$(now)
state="" jid=""
if jid=$(timeout "$STEP_TIMEOUT" sbatch --parsable --wait -n 2 --time=5 -J smoke \
    --chdir="$WORK" -o "$WORK/2-%j.out" \
    --wrap "srun --mpi=pmi2 $PY $WORK/probe.py" 2>"$WORK/2.err"); then
    jid=${jid%%;*}
    # The job record reaches slurmdbd asynchronously: poll sacct (<= 30 s).
    for _ in $(seq 150); do
        state=$(sacct -j "$jid" -n -P -X -o State 2>/dev/null | head -n1)
        [[ $state == COMPLETED ]] && break
        sleep 0.2
    done
fi
if [[ $state == COMPLETED ]] && check_probe "$WORK/2-$jid.out" 2; then
    pass "2 sbatch --wait job $jid, sacct: $state" "$t"
else
    fail "2 sbatch --wait" "$t" "job '$jid' sacct state '$state'; $(cat "$WORK/2.err" "$WORK"/2-*.out 2>/dev/null | head -n 20)"
fi

# --- 3. two nodes, 4 ranks, stress -------------------------------------------
if ((NNODES < 2)); then
    if ((REQUIRE_NODES >= 2)); then
        FAILED=$((FAILED + 1)); echo "FAIL 3: cluster has $NNODES node(s), need 2 (cluster.sh up --nodes 2)"
    else
        SKIPPED=$((SKIPPED + 1)); echo "SKIP 3: needs 2 nodes (cluster.sh up --nodes 2)"
    fi
else
    for i in $(seq "$STRESS"); do
        t=$(now)
        # Odd runs: Slurm's default block layout (3+1); even runs: 2 per node.
        extra=()
        ((i % 2 == 0)) && extra=(--ntasks-per-node=2)
        if timeout "$STEP_TIMEOUT" srun -N 2 -n 4 "${extra[@]}" --mpi=pmi2 "$PY" "$WORK/probe.py" \
            >"$WORK/3.out" 2>"$WORK/3.err" && check_probe "$WORK/3.out" 4 node1 node2; then
            pass "3.$i srun -N 2 -n 4 ${extra[*]:+${extra[*]} }--mpi=pmi2 (size 4 on node1+node2)" "$t"
        else
            fail "3.$i srun -N 2 -n 4 ${extra[*]}" "$t" "$(cat "$WORK/3.out" "$WORK/3.err" | head -n 20)"
        fi
    done
fi

echo "$PASSED passed, $FAILED failed, $SKIPPED skipped"
((FAILED == 0))
