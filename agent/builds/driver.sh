#!/bin/sh
# Runs inside a build dyno: Heroku's buildpack API v2 over the source at /app.
#   /tmp/build/buildpacks/NN-NAME  the buildpacks, in order (read-only)
#   /tmp/cache                     the app's build cache, kept between builds
#   /tmp/env                       one file per config var (read-only)
#   /tmp/out                       what the agent reads back: used buildpacks, release YAML
# $1 is "all" (every buildpack must detect the app and runs) or "first" (the first that
# detects runs). Exit 99: no buildpack detected the app; 98: one of "all" did not.
set -u
mode=${1:-first}
BUILD_DIR=/app
CACHE_DIR=/tmp/cache
ENV_DIR=/tmp/env
OUT=/tmp/out
export STACK="${STACK:-host}"
cd "$BUILD_DIR" || exit 1
used=0
for bp in /tmp/build/buildpacks/*; do
    [ -d "$bp" ] || continue
    name=${bp##*/}
    name=${name#*-}
    if label=$("$bp/bin/detect" "$BUILD_DIR"); then
        label=$(printf '%s\n' "$label" | head -n 1)
        echo "-----> ${label:-$name} app detected"
    elif [ "$mode" = all ]; then
        echo " !     The buildpack $name does not apply to this app (its bin/detect failed)"
        exit 98
    else
        continue
    fi
    "$bp/bin/compile" "$BUILD_DIR" "$CACHE_DIR" "$ENV_DIR"
    status=$?
    if [ "$status" -ne 0 ]; then
        echo " !     Push rejected, failed to compile ${label:-$name} app (the buildpack $name exited $status)"
        exit "$status"
    fi
    if [ -x "$bp/bin/release" ]; then
        if ! "$bp/bin/release" "$BUILD_DIR" > "$OUT/$(printf %02d "$used").release.yml"; then
            echo " !     The buildpack $name's bin/release failed"
            exit 1
        fi
    fi
    echo "$name" >> "$OUT/buildpacks"
    used=$((used + 1))
    [ "$mode" = first ] && break
done
if [ "$used" -eq 0 ]; then
    echo " !     No default language could be detected for this app."
    exit 99
fi
echo "-----> Compiled with ${used} buildpack(s)"
