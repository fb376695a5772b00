#!/usr/bin/env bash
# CI: build docker/Dockerfile without a Docker engine (buildah, chroot isolation) on a Debian
# bookworm base made by debootstrap, run `pyact demo` inside the image, and check its outputs
# with the same checks as tests/test_demo.py (tests/check_demo.py).
#
# Build args: BASE_IMAGE (here the debootstrap image), TORCH_INDEX_URL (empty: PyPI, the only
# index this machine reaches). pip reaches the index through the host's CA bundle, handed in as
# the build secret `pipcert`.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for tool in buildah podman debootstrap; do command -v "$tool" >/dev/null || need+=("$tool"); done
if ((${#need[@]})); then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
fi

base=localhost/pyact-base-bookworm
work=$(mktemp -d)
trap 'rm -rf "$work"; [ -n "${ctr:-}" ] && buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT

if ! buildah inspect --type image "$base" >/dev/null 2>&1; then
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$work/rootfs" http://deb.debian.org/debian
    tar -C "$work/rootfs" -c . | podman import - "$base"
    rm -rf "$work/rootfs"
fi

# the CA bundle the host's pip uses (PIP_CERT, or `cert` in a pip config file)
cert=${PIP_CERT:-$(python3 -m pip config list 2>/dev/null | sed -n "s/^[^=]*\.cert='\(.*\)'$/\1/p" | head -n 1)}
secret=()
if [ -n "$cert" ] && [ -s "$cert" ]; then
    secret=(--secret "id=pipcert,src=$cert")
fi

buildah bud --isolation chroot --layers \
    --build-arg "BASE_IMAGE=$base" --build-arg "TORCH_INDEX_URL=" "${secret[@]}" \
    -f docker/Dockerfile -t localhost/pyact-torch .

ctr=$(buildah from localhost/pyact-torch)
# the image's default command, as `docker run pyact-torch` would run it
buildah run --isolation chroot --user pyact "$ctr" -- pyact demo --out /runs/demo-output
buildah run --isolation chroot "$ctr" -- tar -C /runs -c demo-output | tar -x -C "$work"
.venv/bin/python tests/check_demo.py "$work/demo-output" "container demo"
