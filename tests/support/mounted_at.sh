# Run a command with a directory visible at a path this machine does not have (e.g. DFP's
# /errorfiles), without creating it: inside a private mount namespace (`unshare --mount`,
# root) a tmpfs at /srv gets every top-level entry of / bound in, plus DIRECTORY at PATH,
# and the command runs chrooted there. Same network, same files, one extra directory.
#   unshare --mount --propagation private sh mounted_at.sh DIRECTORY PATH COMMAND...
set -e
directory=$1 target=$2
shift 2
root=/srv
mount -t tmpfs pyroute-test-root "$root"
for entry in /*; do
  name=${entry#/}
  case $name in srv|lost+found) continue;; esac
  if [ -L "$entry" ]; then cp -P "$entry" "$root/$name"
  elif [ -d "$entry" ]; then mkdir "$root/$name"; mount --rbind "$entry" "$root/$name"
  fi
done
mkdir -p "$root$target"
mount --bind "$directory" "$root$target"
cd "$root"
exec chroot "$root" "$@"
