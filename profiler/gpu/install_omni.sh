#!/usr/bin/env bash
# Runs on the GPU host: stages this part in /tmp/omni-bundle; once every part is there, checks
# the checksum and unpacks vLLM-Omni and its pins into /tmp/site-omni. Idempotent: a finished
# install is kept. Needs the vLLM bundle in /tmp/site for the import check (it is skipped, with a
# note, when /tmp/site is not there yet). Afterwards: export PYTHONPATH=/tmp/site-omni:/tmp/site:$PWD
set -euo pipefail
D=$(cd "$(dirname "$0")" && pwd)
STAGE=/tmp/omni-bundle; SITE=/tmp/site-omni
if [ -f "$SITE/.bundle-complete" ]; then echo "[omni-bundle] already installed in $SITE"; exit 0; fi
read -r N SUM < "$D/MANIFEST"
mkdir -p "$STAGE"; cp "$D"/part.* "$STAGE/"
HAVE=$(ls "$STAGE"/part.* | wc -l)
if [ "$HAVE" -lt "$N" ]; then
    echo "[omni-bundle] staged $HAVE of $N parts; send the next part"
    exit 0
fi
cat "$STAGE"/part.* > "$STAGE/omni-site.tar.xz"
echo "$SUM  $STAGE/omni-site.tar.xz" | sha256sum -c --quiet
rm -rf "$SITE.tmp"; mkdir -p "$SITE.tmp"
python3 -c "import tarfile,sys; tarfile.open(sys.argv[1], 'r:xz').extractall(sys.argv[2])" \
    "$STAGE/omni-site.tar.xz" "$SITE.tmp"
rm -rf "$SITE"; mv "$SITE.tmp/site" "$SITE"; rm -rf "$SITE.tmp" "$STAGE"
touch "$SITE/.bundle-complete"
if [ -d /tmp/site ]; then
    PYTHONPATH="$SITE:/tmp/site" python3 -c "import vllm_omni, diffusers, importlib.metadata as m; \
print('[omni-bundle] installed vllm-omni', m.version('vllm-omni'), 'diffusers', diffusers.__version__)"
else
    echo "[omni-bundle] installed in $SITE (import check skipped: /tmp/site, the vLLM bundle, is not installed yet)"
fi
