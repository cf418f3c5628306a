#!/usr/bin/env bash
# Keep the tree that travels to a device machine under its 64 MiB (README, "On a GPU machine"):
#   bash scripts/device_tree.sh out    # take reports/, models/ and the face detector out of the index, ignored
#   bash scripts/device_tree.sh back   # put them back: do this before committing anything
# Training and evaluation use none of them; the pack of FER-2013 (47-52 MiB) goes in .carry/.
set -euo pipefail
cd "$(dirname "$0")/.."
paths=(reports models src/ferkit/weights/centerface.onnx)
exclude=$(git rev-parse --git-path info/exclude) # .git/info/exclude, also in a worktree
mkdir -p "$(dirname "$exclude")"
case "${1:-}" in
out)
    if grep -qxF "/${paths[0]}" "$exclude" 2>/dev/null; then
        echo "device_tree.sh: already out (run back first)" >&2
        exit 1
    fi
    if ! git diff --cached --quiet -- "${paths[@]}"; then # `back` resets them to HEAD: the staging would be lost
        echo "device_tree.sh: changes are staged under ${paths[*]}: commit them (or unstage) first" >&2
        exit 1
    fi
    printf '/%s\n' "${paths[@]}" >>"$exclude" # first: a failed `git rm` leaves them ignored, not deleted
    git rm -r -q --cached "${paths[@]}"
    ;;
back)
    git reset -q HEAD -- "${paths[@]}"
    for p in "${paths[@]}"; do
        grep -vxF "/$p" "$exclude" >"$exclude.new" || true
        mv "$exclude.new" "$exclude"
    done
    ;;
*)
    echo "usage: bash scripts/device_tree.sh out | back" >&2
    exit 2
    ;;
esac
git status --short | sed -n 1,5p  # not head: its closed pipe fails the script (pipefail)
