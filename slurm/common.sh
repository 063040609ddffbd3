# shellcheck shell=bash
# Shared preamble of mpilayer's Slurm batch scripts (slurm/*.sbatch).
#
# Sourced, not executed. The caller has already run `set -euo pipefail` and
# exported MPILAYER_HOME (the mpilayer checkout that holds this file); see the
# top of slurm/matmul.sbatch for how it is found despite sbatch spooling.
#
# Environment variables read (all optional):
#   MPILAYER_VENV            virtualenv to use; default $MPILAYER_HOME/.venv if it
#                            exists, else whatever `mpilayer`/python is on PATH;
#                            "none" = do not activate any venv.
#   MPILAYER_LAUNCHER        srun | mpiexec | auto (default auto, see mpilayer_choose_launcher)
#   MPILAYER_PROBE_TIMEOUT   seconds allowed for auto's srun probe (default 60)
#   MPILAYER_DEADLINE_MARGIN seconds (e.g. 120) or percent of the time left (e.g. 15%)
#                            kept free before the job's time limit; default max(30 s, 10%)
#   MPILAYER_NP              number of ranks when the script runs outside Slurm (default 2)
#   MPILAYER_SIGNAL_LEAD     seconds before the time limit at which Slurm's early SIGUSR1 warning
#                            is passed on to the run (default 30; see mpilayer_run_forwarding)
#   MPILAYER_DRY_RUN=1       print the final command instead of running it

mpilayer_log() { printf 'mpilayer-slurm: %s\n' "$*"; }
mpilayer_die() { printf 'mpilayer-slurm: error: %s\n' "$*" >&2; exit 2; }

# --- Python environment -----------------------------------------------------
# Sets MPILAYER_CMD (array): how to run the CLI on every rank.
mpilayer_activate() {
    local venv=${MPILAYER_VENV:-}
    if [[ $venv == none ]]; then
        venv=
    elif [[ -n $venv ]]; then
        [[ -x $venv/bin/python ]] || mpilayer_die "MPILAYER_VENV=$venv has no bin/python"
    elif [[ -x $MPILAYER_HOME/.venv/bin/python ]]; then
        venv=$MPILAYER_HOME/.venv
    fi
    if [[ -n $venv ]]; then
        venv=$(cd "$venv" && pwd)
        # What `source bin/activate` does, minus the prompt (and robust to a moved venv).
        export VIRTUAL_ENV=$venv
        export PATH=$venv/bin:$PATH
        unset PYTHONHOME
    fi
    if command -v mpilayer >/dev/null 2>&1; then
        MPILAYER_CMD=("$(command -v mpilayer)")
    else
        # No console script (e.g. checkout not pip-installed): run the package from the checkout.
        local py
        py=$(command -v python || command -v python3) || mpilayer_die "no mpilayer and no python on PATH"
        export PYTHONPATH=$MPILAYER_HOME${PYTHONPATH:+:$PYTHONPATH}
        MPILAYER_CMD=("$py" -m mpilayer)
    fi
    mpilayer_log "venv: ${venv:-<none>}; command: ${MPILAYER_CMD[*]}"
}

# --- threads ---------------------------------------------------------------
# One BLAS/OpenMP thread per rank unless the job asked for more CPUs per task.
mpilayer_set_threads() {
    local n=${SLURM_CPUS_PER_TASK:-1}
    export OMP_NUM_THREADS=$n OPENBLAS_NUM_THREADS=$n MKL_NUM_THREADS=$n
}

# --- launcher --------------------------------------------------------------
# Number of ranks: SLURM_NTASKS, else (sbatch given -N only) the sum of
# SLURM_TASKS_PER_NODE ("2(x3),1" = 7), else MPILAYER_NP outside Slurm (default 2).
mpilayer_ntasks() {
    if [[ -n ${SLURM_NTASKS:-} ]]; then echo "$SLURM_NTASKS"; return; fi
    if [[ -n ${SLURM_TASKS_PER_NODE:-} ]]; then
        local item total=0 IFS=,
        for item in $SLURM_TASKS_PER_NODE; do
            if [[ $item =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
                total=$((total + BASH_REMATCH[1] * BASH_REMATCH[2]))
            elif [[ $item =~ ^[0-9]+$ ]]; then
                total=$((total + item))
            fi
        done
        ((total > 0)) && { echo "$total"; return; }
    fi
    echo "${MPILAYER_NP:-2}"
}

# Sets MPILAYER_LAUNCH (array) and MPILAYER_LAUNCHER_CHOSEN.
#
# auto picks `srun --mpi=pmi2` when (1) we are inside a Slurm job, (2) srun has
# the pmi2 plugin, and (3) a probe step `srun --mpi=pmi2 python -c <mpi4py>` over
# the whole allocation reports one world of SLURM_NTASKS ranks. Otherwise it
# falls back to the MPI's own `mpiexec`, which inside an allocation starts its
# proxies through srun (MPICH/Hydra, Open MPI) and needs no Slurm PMI at all.
# srun is preferred because Slurm then tracks, signals and accounts every rank
# and kills the step when one rank fails. The probe exists because a
# mismatched PMI fails silently: `srun --mpi=none` (or a PMI the MPI does not
# speak) gives N independent jobs of size 1 instead of one job of size N; with
# a PMIx-only setup the probe errors or hangs, hence its timeout. With the
# `mpich` PyPI wheel both launchers work and auto picks srun (the probe costs
# about a second). PMIx (--mpi=pmix) does not work with that wheel.
mpilayer_choose_launcher() {
    local want=${MPILAYER_LAUNCHER:-auto} ntasks
    ntasks=$(mpilayer_ntasks)
    case $want in
        srun | mpiexec) MPILAYER_LAUNCHER_CHOSEN=$want ;;
        auto)
            if [[ -z ${SLURM_JOB_ID:-} ]]; then
                MPILAYER_LAUNCHER_CHOSEN=mpiexec
                mpilayer_log "launcher auto: not inside a Slurm job -> mpiexec"
            elif ! command -v srun >/dev/null 2>&1; then
                MPILAYER_LAUNCHER_CHOSEN=mpiexec
                mpilayer_log "launcher auto: no srun on PATH -> mpiexec"
            elif ! srun --mpi=list 2>&1 | grep -qw pmi2; then
                MPILAYER_LAUNCHER_CHOSEN=mpiexec
                mpilayer_log "launcher auto: this Slurm has no mpi/pmi2 plugin -> mpiexec"
            elif ((${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}} > 1)); then
                # Across nodes, the mpich wheel's network addresses travel through Slurm's pmi2
                # key-value store; with Slurm 22.05 that exchange intermittently fails ("value not
                # properly terminated", then an abort in UCX), which a probe cannot rule out.
                # Hydra's mpiexec uses its own PMI and still starts its proxies with srun.
                MPILAYER_LAUNCHER_CHOSEN=mpiexec
                mpilayer_log "launcher auto: ${SLURM_JOB_NUM_NODES:-${SLURM_NNODES}} nodes -> mpiexec (srun --mpi=pmi2 is used within one node; MPILAYER_LAUNCHER=srun forces it)"
            else
                local py got
                py=$(command -v python || command -v python3 || echo python)
                got=$(timeout "${MPILAYER_PROBE_TIMEOUT:-60}" srun --mpi=pmi2 --kill-on-bad-exit=1 -n "$ntasks" \
                    "$py" -c 'from mpi4py import MPI; c = MPI.COMM_WORLD; c.rank == 0 and print("MPILAYER_PROBE_SIZE", c.size)' \
                    2>/dev/null | grep -c "^MPILAYER_PROBE_SIZE $ntasks\$") || true
                if [[ $got == 1 ]]; then
                    MPILAYER_LAUNCHER_CHOSEN=srun
                    mpilayer_log "launcher auto: srun --mpi=pmi2 probe saw one world of $ntasks ranks -> srun"
                else
                    MPILAYER_LAUNCHER_CHOSEN=mpiexec
                    mpilayer_log "launcher auto: srun --mpi=pmi2 probe did not give one world of $ntasks ranks -> mpiexec"
                fi
            fi
            ;;
        *) mpilayer_die "MPILAYER_LAUNCHER must be srun, mpiexec or auto (got '$want')" ;;
    esac
    if [[ $MPILAYER_LAUNCHER_CHOSEN == srun ]]; then
        [[ -n ${SLURM_JOB_ID:-} ]] || mpilayer_die "MPILAYER_LAUNCHER=srun needs a Slurm job"
        # Slurm 22.05's srun does not inherit --cpus-per-task from sbatch: pass it on.
        MPILAYER_LAUNCH=(srun --mpi=pmi2 --kill-on-bad-exit=1 -n "$ntasks"
                         ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK})
    else
        command -v mpiexec >/dev/null 2>&1 || mpilayer_die "no mpiexec on PATH (install the mpich wheel or load an MPI)"
        MPILAYER_LAUNCH=("$(command -v mpiexec)" -n "$ntasks")
    fi
    mpilayer_log "launcher: ${MPILAYER_LAUNCH[*]}"
}

# --- deadline --------------------------------------------------------------
# "[D-]HH:MM:SS" / "MM:SS" / "SS" -> seconds; fails on UNLIMITED, NOT_SET, ...
mpilayer_to_seconds() {
    local s=$1 days=0 f
    [[ $s =~ ^([0-9]+-)?[0-9]+(:[0-9]+){0,2}$ ]] || return 1
    if [[ $s == *-* ]]; then days=${s%%-*}; s=${s#*-}; fi
    IFS=: read -r -a f <<<"$s"
    case ${#f[@]} in
        1) echo $((10#$days * 86400 + 10#${f[0]})) ;;
        2) echo $((10#$days * 86400 + 10#${f[0]} * 60 + 10#${f[1]})) ;;
        3) echo $((10#$days * 86400 + 10#${f[0]} * 3600 + 10#${f[1]} * 60 + 10#${f[2]})) ;;
    esac
}

# Seconds left before the job's time limit; fails when unknown or unlimited.
mpilayer_time_left() {
    [[ -n ${SLURM_JOB_ID:-} ]] || return 1
    local left limit run rec
    left=$(squeue -h -j "$SLURM_JOB_ID" -o %L 2>/dev/null | head -n 1) || left=
    if mpilayer_to_seconds "$left" 2>/dev/null; then return 0; fi
    # squeue failed or printed something odd: time limit minus run time from scontrol.
    rec=$(scontrol -o show job "$SLURM_JOB_ID" 2>/dev/null) || return 1
    limit=$(sed -n 's/.* TimeLimit=\([^ ]*\).*/\1/p' <<<"$rec")
    run=$(sed -n 's/.* RunTime=\([^ ]*\).*/\1/p' <<<"$rec")
    limit=$(mpilayer_to_seconds "$limit") || return 1
    run=$(mpilayer_to_seconds "$run") || run=0
    echo $((limit - run))
}

# mpilayer_has_option --NAME ARGS...: true if ARGS carry --NAME or --NAME=...
# (options end at "--").
mpilayer_has_option() {
    local name=$1 a
    shift
    for a in "$@"; do
        [[ $a == -- ]] && return 1
        [[ $a == "$name" || $a == "$name"=* ]] && return 0
    done
    return 1
}

# Sets MPILAYER_DEADLINE_ARGS (array): empty, or (--deadline SECONDS) derived
# from the time the job has left minus a safety margin, so that a run stopped
# by the deadline still has time to write its best resolution before Slurm
# kills the job.
mpilayer_derive_deadline() {
    MPILAYER_DEADLINE_ARGS=()
    if mpilayer_has_option --deadline "$@"; then
        mpilayer_log "deadline: given on the command line"
        return 0
    fi
    local left margin spec=${MPILAYER_DEADLINE_MARGIN:-} deadline
    if [[ -z ${SLURM_JOB_ID:-} ]]; then
        mpilayer_log "deadline: none (not in a Slurm job); the product runs to completion"
        return 0
    fi
    if ! left=$(mpilayer_time_left); then
        mpilayer_log "deadline: none (the job has no time limit); the product runs to completion"
        return 0
    fi
    if [[ -z $spec ]]; then
        margin=$((left / 10)); ((margin >= 30)) || margin=30
        spec="max(30 s, 10%)"
    elif [[ $spec =~ ^[0-9]+$ ]]; then
        margin=$spec
    elif [[ $spec =~ ^([0-9]+)%$ ]]; then
        margin=$((left * BASH_REMATCH[1] / 100))
    else
        mpilayer_die "MPILAYER_DEADLINE_MARGIN must be whole seconds (e.g. 60) or a percentage (e.g. 10%), got '$spec'"
    fi
    deadline=$((left - margin))
    if ((deadline < 1)); then
        deadline=$((left / 2)); ((deadline >= 1)) || deadline=1
        mpilayer_log "warning: time left ($left s) is not above the margin ($margin s); using --deadline $deadline"
    fi
    MPILAYER_DEADLINE_ARGS=(--deadline "$deadline")
    mpilayer_log "deadline: no --deadline given; time left ${left} s - margin ${margin} s (${spec}) -> --deadline ${deadline}"
}

# --- run -------------------------------------------------------------------
mpilayer_banner() {
    mpilayer_log "job ${SLURM_JOB_ID:-<none>} (${SLURM_JOB_NAME:-}) on ${SLURM_JOB_NODELIST:-$(hostname)}:" \
        "${SLURM_JOB_NUM_NODES:-1} node(s), $(mpilayer_ntasks) task(s), ${SLURM_CPUS_PER_TASK:-1} cpu(s)/task;" \
        "MPILAYER_HOME=$MPILAYER_HOME; workdir $PWD"
}

# mpilayer_run_once SUBCOMMAND [ARGS...]: run the CLI once, in the batch step, for
# drivers that start their own MPI runs (`mpilayer scaling`).
mpilayer_run_once() {
    local cmd=("${MPILAYER_CMD[@]}" "$@")
    local shown t0=$SECONDS rc=0
    printf -v shown '%q ' "${cmd[@]}"
    mpilayer_log "running: ${shown% }"
    if [[ ${MPILAYER_DRY_RUN:-0} == 1 ]]; then return 0; fi
    "${cmd[@]}" || rc=$?
    mpilayer_log "finished with exit code $rc after $((SECONDS - t0)) s"
    return "$rc"
}

# mpilayer_launch SUBCOMMAND [ARGS...]: run the CLI subcommand on all ranks.
mpilayer_launch() {
    local sub=$1; shift
    local cmd=("${MPILAYER_LAUNCH[@]}" "${MPILAYER_CMD[@]}" "$sub" "${MPILAYER_DEADLINE_ARGS[@]}" "$@")
    local shown
    printf -v shown '%q ' "${cmd[@]}"
    mpilayer_log "running: ${shown% }"
    if [[ ${MPILAYER_DRY_RUN:-0} == 1 ]]; then return 0; fi
    local t0=$SECONDS rc=0
    mpilayer_run_forwarding "${cmd[@]}" || rc=$?
    mpilayer_log "finished with exit code $rc after $((SECONDS - t0)) s"
    return "$rc"
}

# mpilayer_run_forwarding CMD...: run CMD (the launcher) in the background and wait for it,
# passing a stop signal that reaches this batch shell on to it as SIGUSR1. The shell gets
# SIGUSR1 from `#SBATCH --signal=B:USR1@60` (time limit near) and SIGTERM/SIGINT from scancel
# or the time limit; srun and mpiexec (Hydra) forward SIGUSR1 to every rank, and mpilayer's
# master (rank 0) then publishes every tile at its best resolution and stops the workers
# (which ignore the signal). Without this, bash would die on the signal, or (for a trapped
# signal) wait for the launcher to end before handling it, and Slurm would kill the step.
#
# Slurm may send the --signal warning up to a minute early (its timers are that coarse), so a
# SIGUSR1 that comes with more than MPILAYER_SIGNAL_LEAD seconds (default 30) left before the
# time limit is passed on only that long before it; SIGTERM and SIGINT are passed on at once.
mpilayer_run_forwarding() {
    local rc=0
    MPILAYER_CHILD= MPILAYER_SLEEPER=
    "$@" &
    MPILAYER_CHILD=$!
    trap 'mpilayer_on_warning' USR1
    trap 'mpilayer_stop_child SIGTERM' TERM
    trap 'mpilayer_stop_child SIGINT' INT
    case ${MPILAYER_PENDING:-} in  # a signal that came before the run (the sbatch script's early traps)
        USR1) mpilayer_on_warning ;;
        TERM) mpilayer_stop_child SIGTERM ;;
        INT) mpilayer_stop_child SIGINT ;;
    esac
    MPILAYER_PENDING=
    while kill -0 "$MPILAYER_CHILD" 2>/dev/null; do
        wait "$MPILAYER_CHILD" || true  # returns early (status > 128) when a trapped signal arrives
    done
    wait "$MPILAYER_CHILD" || rc=$?  # the launcher's own exit status (bash keeps it)
    trap - USR1 TERM INT
    [[ -z $MPILAYER_SLEEPER ]] || kill "$MPILAYER_SLEEPER" 2>/dev/null || true
    return "$rc"
}

mpilayer_stop_child() {
    mpilayer_log "got $1: asking the run to stop"
    kill -USR1 "$MPILAYER_CHILD" 2>/dev/null || true
}

mpilayer_on_warning() {
    local left lead=${MPILAYER_SIGNAL_LEAD:-30} delay
    left=$(mpilayer_time_left 2>/dev/null) || left=0
    delay=$((left - lead))
    if ((delay <= 0)); then
        mpilayer_stop_child "SIGUSR1 (time limit in ${left} s)"
    elif [[ -z $MPILAYER_SLEEPER ]]; then
        mpilayer_log "got SIGUSR1 (time limit in ${left} s): asking the run to stop in ${delay} s"
        (sleep "$delay" && kill -USR1 "$MPILAYER_CHILD" 2>/dev/null) &
        MPILAYER_SLEEPER=$!
    fi
}

# Everything but the launch: called by each sbatch script after sourcing.
mpilayer_prepare() {
    MPILAYER_DEADLINE_ARGS=()
    mpilayer_banner
    mpilayer_activate
    mpilayer_set_threads
    mpilayer_choose_launcher
}
