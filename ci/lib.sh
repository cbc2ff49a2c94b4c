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
