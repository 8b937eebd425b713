# shellcheck shell=bash
# Helpers the SLURM scripts source: node names of the allocation and the dry run.
#
# DRY_RUN=1 prints every command instead of running it; with no SLURM allocation, a simulated one
# comes from SLURM_JOB_NODELIST (e.g. "node[01-02]"), SLURM_NNODES and SLURM_JOB_ID.

# The allocation's node names, one a line: scontrol where it exists, else the plain forms
# "a,b,c" and "prefix[01-03,07]" expanded here (enough for a dry run on a laptop).
slurm_hostnames() {
  if command -v scontrol >/dev/null 2>&1; then
    scontrol show hostnames "$SLURM_JOB_NODELIST"
    return
  fi
  python3 - "$SLURM_JOB_NODELIST" <<'PY'
import re, sys
for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", sys.argv[1]):
    m = re.fullmatch(r"(.*)\[(.*)\]", part)
    if not m:
        print(part)
        continue
    for item in m.group(2).split(","):
        lo, _, hi = item.partition("-")
        for i in range(int(lo), int(hi or lo) + 1):
            print(f"{m.group(1)}{i:0{len(lo)}d}")
PY
}

# Run a command, or with DRY_RUN print it (shell-quoted) instead.
run_or_print() {
  if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}
