#!/usr/bin/env bash
# Coverage-guided fuzzing with AFL++ through cargo-afl, on stable Rust.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Builds the targets of fuzz/ with AFL++ instrumentation, runs each for a
# bounded time (default 600 s) starting from fuzz/corpus/<target>/, then
# keeps the inputs that add coverage (afl-cmin) in that corpus and copies
# every crash to fuzz/corpus/<target>/crash-* (CI replays them all:
# integration-tests/tests/fuzz_corpus.rs). Needs cargo-afl:
#   cargo install cargo-afl && cargo afl config --build
# CI does not run this script.
set -euo pipefail

cd "$(dirname "$0")/../fuzz"
# Where cargo afl puts the targets (CARGO_TARGET_DIR is honoured).
target="$(../scripts/target-dir.sh)"
seconds="${1:-600}"
shift || true
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=(dns_handler update_decoder manifest_loader)

export AFL_SKIP_CPUFREQ=1 AFL_NO_UI=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1
nice -n 10 cargo afl build --release

for t in "${targets[@]}"; do
  out="$target/afl/$t"
  rm -rf "$out"
  mkdir -p "$out"
  echo "== $t: ${seconds}s"
  # -V: stop after the given seconds; -m none: Rust binaries need more than the default.
  nice -n 10 cargo afl fuzz -V "$seconds" -m none -i "corpus/$t" -o "$out" "$target/release/$t" \
    > "$out/fuzz.log" 2>&1 || true
  stats="$out/default/fuzzer_stats"
  if [ -f "$stats" ]; then
    grep -E '^(run_time|execs_done|execs_per_sec|corpus_count|saved_crashes|saved_hangs|bitmap_cvg) ' "$stats"
  else
    tail -20 "$out/fuzz.log"
  fi
  for c in "$out"/default/crashes/id:*; do
    [ -e "$c" ] || continue
    cp "$c" "corpus/$t/crash-$(basename "$c" | tr ':,' '__')"
  done
  # Keep the smallest set of inputs with the same coverage (afl-cmin); where
  # afl-cmin cannot run the target, the queue entries that found new
  # coverage (`+cov`). Seeds are in the corpus already.
  min="$out/cmin"
  if ! nice -n 10 cargo afl cmin -m none -i "$out/default/queue" -o "$min" -- "$target/release/$t" > "$out/cmin.log" 2>&1; then
    mkdir -p "$min"
    for f in "$out"/default/queue/id:*+cov*; do
      [ -e "$f" ] && cp "$f" "$min/"
    done
  fi
  for f in "$min"/*; do
    [ -e "$f" ] || continue
    name="$(basename "$f" | tr ':,+' '___')"
    case "$name" in *orig_*) continue ;; esac
    cp "$f" "corpus/$t/afl-${name:0:40}"
  done
  echo "   corpus/$t: $(ls "corpus/$t" | wc -l) inputs"
done
