# shellcheck shell=bash
# Shared by ci/test, ci/demo and ci/bench: install, build strata, make the
# Debian fixture and an image of it. Source it; it does nothing by itself.

CI_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$CI_DIR")
# shellcheck source=ci/setup
source "$CI_DIR/setup"

# Where images live during a run: sparse files, a few GiB apparent size.
STRATA_WORK=${STRATA_WORK:-/var/tmp/strata-work}

cargo_env() {
    if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
}

# build_strata [--release]: prints the path of the strata binary. Says what
# it is doing on stderr; the compiler's output goes to a log that is shown
# only when the build fails.
# shellcheck disable=SC2120 # the optional --release is passed by ci/bench only
build_strata() {
    cargo_env
    if ! command -v cargo >/dev/null; then
        echo "ci: cargo not found: install a Rust toolchain (rustup, or apt-get install cargo) and run again" >&2
        return 2
    fi
    local profile=debug
    [ "${1:-}" = --release ] && profile=release
    local bin="${CARGO_TARGET_DIR:-$REPO/target}/$profile/strata"
    local log=/var/tmp/strata-cargo-build.log t0=$SECONDS
    if [ -x "$bin" ]; then
        printf 'ci: building strata (%s) ... ' "$profile" >&2
    else
        # Measured (2026-11-27): a cold debug build of strata is ~5.7
        # CPU-minutes (318 s user + 25 s sys), so about 3-4 minutes on two idle
        # cores; it took 20 minutes with the cores shared by other builds.
        printf 'ci: compiling strata (%s) for the first time: about 4 minutes on 2 idle cores, longer on a busy machine ... ' "$profile" >&2
    fi
    if (cd "$REPO" && cargo build --locked "$@" --bin strata) >"$log" 2>&1 </dev/null; then
        printf 'done (%d s)\n' $((SECONDS - t0)) >&2
    else
        printf 'FAILED after %d s; cargo said (full output in %s):\n' $((SECONDS - t0)) "$log" >&2
        tail -n 60 "$log" >&2
        return 1
    fi
    echo "$bin"
}

# fixture_rootfs STRATA: the Debian fixture (built once, then cached) copied
# to $STRATA_WORK/debian-rootfs; prints that path.
fixture_rootfs() {
    mkdir -p "$STRATA_WORK"
    local rootfs="$STRATA_WORK/debian-rootfs"
    rm -rf "$rootfs"
    "$1" fixture debian --output "$rootfs" >&2
    echo "$rootfs"
}

# build_image STRATA ROOTFS NAME [build args...]: $STRATA_WORK/NAME.img with
# its manifest next to it; prints the image path.
build_image() {
    local strata=$1 rootfs=$2 name=$3
    shift 3
    "$strata" build --rootfs "$rootfs" --output "$STRATA_WORK/$name.img" --size 4G --force "$@" >&2
    echo "$STRATA_WORK/$name.img"
}

# fixture_image STRATA NAME [build args...]: both of the above.
fixture_image() {
    local strata=$1 name=$2 rootfs
    shift 2
    rootfs=$(fixture_rootfs "$strata")
    build_image "$strata" "$rootfs" "$name" "$@"
    rm -rf "$rootfs"
}
