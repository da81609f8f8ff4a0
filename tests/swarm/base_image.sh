#!/usr/bin/env bash
# A Python base image without a registry: debootstrap of the Debian release this machine
# runs, with its python3 (and python3-venv, which the Dockerfile uses to make pyroute's
# own environment), packed as a tar for `docker import`. Cached: the tar is made once per
# release and package list and reused by later runs.
#
# usage: base_image.sh CACHE_DIR   -> prints the tar's path, then "made" or "reused"
set -euo pipefail

cache=$1
packages=python3,python3-venv,ca-certificates
. /etc/os-release
release=${VERSION_CODENAME:?this machine names no Debian release in /etc/os-release}
tar="$cache/debian-$release-$(echo "$packages" | tr , -).tar"
if [ -s "$tar" ]; then echo "$tar reused"; exit 0; fi

# The mirror apt uses here for that release (a local mirror or proxy works as for apt).
mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Origin: Debian' 'Created-By: Packages' \
  | awk -v r="$release" '$2 == r {print $1; exit}')
mirror=${mirror:-http://deb.debian.org/debian/}
mkdir -p "$cache"
root=$(mktemp -d "$cache/rootfs.XXXXXX")
trap 'rm -rf --one-file-system "$root"' EXIT
debootstrap --variant=minbase --include="$packages" "$release" "$root" "$mirror" >"$cache/debootstrap.log" 2>&1 \
  || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
# What an image does not need at run time (the official slim images drop the same).
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
  "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/*
tar -C "$root" --numeric-owner -cf "$tar.part" .
mv "$tar.part" "$tar"
echo "$tar made"
