#!/usr/bin/env bash
# Builds the offline install bundle of vLLM-Omni 0.26.0 (+ its pins that the GPU host lacks) for
# the Hopper host that already runs the vLLM 0.26.0 bundle (../shared/gpu/make-bundle.sh, /tmp/site).
#
# Output: OUTDIR/p1 .. pN (usually N = 1: about 16 MB), each with one part, install_omni.sh and
# MANIFEST. The wheels are unpacked and recompressed with xz (FlashAttention-3's 105 MB library
# packs to 10 MB), so one part rides along with the last vLLM part in the same device call.
# On the host, after the vLLM bundle: `bash OUTDIR/pI/install_omni.sh` for each part, in order;
# the last one installs into /tmp/site-omni. Then: export PYTHONPATH=/tmp/site-omni:/tmp/site:$PWD
#
# Usage (from the project root):  bash profiler/gpu/make_omni_bundle.sh [OUTDIR] [NAME==VERSION ...]
#   OUTDIR defaults to .gpu-omni (added to .git/info/exclude). PART_MIB=N overrides the part size.
#   Extra pins are bundled too, e.g. av==19.0.2 if a server log ever names a missing module.
#   Cache: ${OMNI_BUNDLE_CACHE:-~/.cache/omni-bundle}.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUTDIR=${1:-.gpu-omni}; shift || true
EXTRA=("$@")
CACHE=${OMNI_BUNDLE_CACHE:-$HOME/.cache/omni-bundle}
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
      --platform linux_x86_64)
mkdir -p "$CACHE/wheels"
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
echo "[omni-bundle] downloading wheels into $CACHE/wheels" >&2
quiet python3 -m pip download -q --no-deps "${PLAT[@]}" -d "$CACHE/wheels" -r "$HERE/requirements-omni.txt" "${EXTRA[@]}"
# exactly the pinned files (the cache may hold other versions from earlier builds)
WHEELS=()
while read -r spec; do
    name=$(echo "$spec" | cut -d= -f1 | tr 'A-Z-' 'a-z_'); ver=$(echo "$spec" | cut -d= -f3)
    f=$(ls "$CACHE"/wheels/"$name"-"$ver"-*.whl 2>/dev/null | head -1)
    [ -n "$f" ] || { echo "[omni-bundle] missing wheel for $spec in $CACHE/wheels" >&2; exit 1; }
    WHEELS+=("$f")
done < <( (sed -e 's/#.*//' -e 's/[[:space:]]//g' "$HERE/requirements-omni.txt"; printf '%s\n' "${EXTRA[@]}") | grep -v '^$')
S=$(mktemp -d); trap 'rm -rf "$S"' EXIT
mkdir -p "$S/site"
for w in "${WHEELS[@]}"; do
    python3 - "$w" "$S/site" <<'PY'
import sys, zipfile, pathlib, shutil
whl, site = sys.argv[1], pathlib.Path(sys.argv[2])
with zipfile.ZipFile(whl) as z:
    z.extractall(site)
# a wheel's <name>.data/{purelib,platlib} belong in site-packages; scripts/headers/data are unused here
for data in site.glob("*.data"):
    for sub in ("purelib", "platlib"):
        d = data / sub
        if d.is_dir():
            for p in d.iterdir():
                shutil.move(str(p), str(site / p.name))
    shutil.rmtree(data)
PY
done
# executable bits for shared libraries (zip extraction drops them)
find "$S/site" -name "*.so*" -exec chmod 755 {} +
echo "[omni-bundle] $(ls "$S/site" | grep -c dist-info) packages unpacked, $(du -sh "$S/site" | cut -f1); compressing" >&2
(cd "$S" && tar -cf - site | xz -9 -T0 > "$S/omni-site.tar.xz")
SUM=$(sha256sum "$S/omni-site.tar.xz" | cut -d' ' -f1)
rm -rf "$OUTDIR"; mkdir -p "$OUTDIR"
TREE_MIB=$(( $(git ls-files -z 2>/dev/null | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1 || echo 0) / 1048576 ))
PART_MIB=${PART_MIB:-$(( 60 - TREE_MIB ))}
[ "$PART_MIB" -ge 8 ] || { echo "[omni-bundle] the tracked tree leaves under 8 MiB per call" >&2; exit 1; }
(cd "$S" && split -b "${PART_MIB}M" -d -a 2 omni-site.tar.xz part.)
N=$(ls "$S"/part.* | wc -l); i=0
for p in "$S"/part.*; do
    i=$((i + 1)); mkdir -p "$OUTDIR/p$i"; mv "$p" "$OUTDIR/p$i/"
    cp "$HERE/install_omni.sh" "$OUTDIR/p$i/"; echo "$N $SUM" > "$OUTDIR/p$i/MANIFEST"
done
EXCL=$(git rev-parse --git-path info/exclude 2>/dev/null || true)
if [ -n "$EXCL" ] && ! grep -qx "/$OUTDIR/" "$EXCL" 2>/dev/null; then
    mkdir -p "$(dirname "$EXCL")"; echo "/$OUTDIR/" >> "$EXCL"
fi
du -sh "$OUTDIR"/p* >&2
echo "[omni-bundle] $N part(s) of <= $PART_MIB MiB (tracked tree $TREE_MIB MiB). On the GPU host, after" >&2
echo "             the vLLM bundle: bash $OUTDIR/pI/install_omni.sh for I = 1..$N, then" >&2
echo "             export PYTHONPATH=/tmp/site-omni:/tmp/site:\$PWD" >&2
