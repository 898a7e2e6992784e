#!/usr/bin/env bash
# Fuzzes every decoder and handler of untrusted input (the entry points of src/fuzz.rs):
# guest frames, fabric frames, QMP replies, control requests, vhost-user messages.
#
#   tools/fuzz.sh [--runs N] [--stable] [TARGET…]   N inputs per target (default 1000000)
#   tools/fuzz.sh --seeds                           rewrite the seed corpora fuzz/corpus/*/
#
# With a nightly toolchain (rustup) it runs `cargo +nightly fuzz run` per target (libFuzzer,
# coverage-guided), installing cargo-fuzz first if it is missing; new inputs go to
# target/fuzz-corpus/<target>/, crashes to fuzz/artifacts/<target>/. Without nightly, or with
# --stable, it runs the stable driver instead: `cargo test --release` of
# fuzz::tests::fuzz_<target> with VFMIG_FUZZ_RUNS=N (mutated seeds and random inputs from a
# fixed seed; a crash is kept in target/fuzz-crashes/<target>/). Keep every crash under
# fuzz/regressions/<target>/: the plain `cargo test` replays them all.
# VFMIG_FUZZ_SANITIZER picks cargo-fuzz's sanitizer (default: address; none is ~2x faster).
set -euo pipefail
cd "$(dirname "$0")/.."

all=(guest fabric qmp control vhost)
runs=1000000
mode=auto
targets=()
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) runs=${2:?--runs needs a number}; shift 2 ;;
        --runs=*) runs=${1#--runs=}; shift ;;
        --stable) mode=stable; shift ;;
        --seeds)
            cargo test --lib fuzz::tests::write_seed_corpus -- --ignored --exact
            exit 0 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "fuzz.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
for t in "${targets[@]}"; do
    case " ${all[*]} " in
        *" $t "*) ;;
        *) echo "fuzz.sh: unknown target $t (targets: ${all[*]})" >&2; exit 2 ;;
    esac
done
case "$runs" in ''|*[!0-9]*) echo "fuzz.sh: --runs wants a number, got $runs" >&2; exit 2 ;; esac

if [ "$mode" = auto ]; then
    mode=stable
    if command -v rustup >/dev/null && rustup toolchain list | grep -q '^nightly'; then
        if cargo +nightly fuzz --version >/dev/null 2>&1 \
            || { echo "fuzz.sh: installing cargo-fuzz" >&2; cargo install cargo-fuzz; }; then
            mode=libfuzzer
        fi
    fi
    [ "$mode" = libfuzzer ] || echo "fuzz.sh: no nightly toolchain or cargo-fuzz: using the stable driver" >&2
fi

summary=()
status=0
for t in "${targets[@]}"; do
    start=$(date +%s)
    if [ "$mode" = libfuzzer ]; then
        mkdir -p "target/fuzz-corpus/$t"
        set +e
        cargo +nightly fuzz run -O -s "${VFMIG_FUZZ_SANITIZER:-address}" "$t" \
            "target/fuzz-corpus/$t" "fuzz/corpus/$t" -- \
            -runs="$runs" -detect_leaks=0 -rss_limit_mb=4096 -timeout=10 -print_final_stats=1 \
            2>&1 | tee "target/fuzz-$t.log" | grep -E '^(#[0-9]+ +DONE|==|SUMMARY|stat::number_of_executed_units|Done)|panicked|artifact'
        rc=${PIPESTATUS[0]}
        set -e
        ran=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "target/fuzz-$t.log" | grep -o '[0-9]*$' || echo "?")
    else
        set +e
        VFMIG_FUZZ_RUNS="$runs" cargo test --release --lib "fuzz::tests::fuzz_$t" -- --exact
        rc=$?
        set -e
        ran=$runs
    fi
    secs=$(( $(date +%s) - start ))
    verdict=ok
    [ "$rc" -eq 0 ] || { verdict="CRASH (exit $rc)"; status=1; }
    summary+=("$(printf '%-8s %-9s %12s inputs %6d s  %s' "$t" "$mode" "$ran" "$secs" "$verdict")")
done
printf '%s\n' "${summary[@]}"
exit "$status"
