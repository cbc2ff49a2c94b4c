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

# build_strata [--release]: prints the path of the strata binary.
build_strata() {
    cargo_env
    (cd "$REPO" && cargo build --quiet --locked "$@" --bin strata) >&2
    if [ "${1:-}" = --release ]; then
        echo "$REPO/target/release/strata"
    else
        echo "$REPO/target/debug/strata"
    fi
}

# fixture_image STRATA NAME [build args...]: builds the Debian fixture (cached)
# and an image of it at $STRATA_WORK/NAME.img; prints the image path.
fixture_image() {
    local strata=$1 name=$2
    shift 2
    mkdir -p "$STRATA_WORK"
    local rootfs="$STRATA_WORK/debian-rootfs"
    rm -rf "$rootfs"
    "$strata" fixture debian --output "$rootfs" >&2
    "$strata" build --rootfs "$rootfs" --output "$STRATA_WORK/$name.img" --size 4G --force "$@" >&2
    rm -rf "$rootfs"
    echo "$STRATA_WORK/$name.img"
}
