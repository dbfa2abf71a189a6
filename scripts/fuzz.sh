#!/usr/bin/env bash
# Builds the cargo-fuzz targets (fuzz/) and runs each for a bounded time; fails if any crashes.
#
#   scripts/fuzz.sh                        # every target, FUZZ_SECONDS (default 20) each
#   FUZZ_SECONDS=600 scripts/fuzz.sh ot    # one target, longer
#
# The machine has only stable Rust: RUSTC_BOOTSTRAP=1 lets it take the nightly flags cargo-fuzz
# passes (sancov, sanitizers). cargo-fuzz is installed (pinned) when missing.
#
# Each target starts from its committed seed corpus, fuzz/corpus/<target>/, which is only read;
# what a run discovers goes to fuzz/target/corpus/<target>/ (ignored by git, kept between local
# runs). A crash leaves its input in fuzz/artifacts/<target>/; replay it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run -O <target> fuzz/artifacts/<target>/<file>
# and, once fixed, add it to the seed corpus.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
SECONDS_EACH=${FUZZ_SECONDS:-20}
# `-O`: release, AddressSanitizer, and the checks and opt-levels fuzz/Cargo.toml sets (README,
# "Fuzzing", has the build figures).
read -r -a BUILD_FLAGS <<<"${FUZZ_BUILD_FLAGS:--O}"

say() { printf '==> %s\n' "$*"; }

if [ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]; then
  say "installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi
export RUSTC_BOOTSTRAP=1
# Allocation as in production: a request larger than the machine gets NULL (so `try_reserve`
# fails and the caller refuses the input; an infallible allocation still aborts, a crash), where
# AddressSanitizer would abort at once. yrs reserves room for as many blocks as an update claims
# (up to 2^32) before reading them; fuzz/corpus/yjs/huge_block_count is such an update. A
# reservation is not memory used: -malloc_limit_mb lets one through untouched, and
# -rss_limit_mb (2 GiB) still fails a target that really grows.
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}allocator_may_return_null=1"

if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi
[ ${#targets[@]} -gt 0 ] || { echo "error: cargo fuzz list found no targets" >&2; exit 1; }

say "building the fuzz targets (${BUILD_FLAGS[*]})"
start=$SECONDS
cargo fuzz build "${BUILD_FLAGS[@]}"
say "built in $((SECONDS - start)) s"

failed=()
for target in "${targets[@]}"; do
  seeds=fuzz/corpus/$target
  [ -d "$seeds" ] || { echo "error: no seed corpus at $seeds" >&2; exit 1; }
  work=fuzz/target/corpus/$target
  mkdir -p "$work"
  say "fuzzing $target for $SECONDS_EACH s"
  # -timeout: an input that takes 10 s is a hang, and a hang on client input is a bug.
  if ! cargo fuzz run "${BUILD_FLAGS[@]}" "$target" "$work" "$seeds" -- \
    -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=65536 \
    -print_final_stats=1; then
    failed+=("$target")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "error: fuzz targets crashed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
say "every fuzz target ran clean for $SECONDS_EACH s"
