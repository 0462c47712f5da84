#!/usr/bin/env bash
# Install Exim 4 (Debian's exim4-daemon-light) for the lab tests, beside Postfix.
#
#   sudo tools/install-exim.sh        # prints where the exim binary is
#
# Debian's exim4 packages conflict with the postfix package the rest of the
# suite needs, so they are not installed with dpkg: the binary's .deb is
# unpacked (dpkg -x) into $HARNESS_EXIM_ROOT (default /opt/harness-exim), where
# harness.lab.exim.EximLab finds it. Also done, as the packages would:
#   - their runtime libraries are installed with apt-get (e.g. libidn12),
#   - a `Debian-exim` system user and group are created (the binary is built
#     with EXIM_USER=ref:Debian-exim and refuses to start without them).
# Nothing else on the system changes: no /etc/exim4, no service, no cron job,
# no sendmail/mailq symlinks outside $HARNESS_EXIM_ROOT.
#
# Only exim4-daemon-light is unpacked: it holds the exim4 binary, and EximLab
# writes its own configuration (exim4-config's files are not used) and needs
# none of exim4-base's helper scripts.
#
# Needs root and Debian's package lists (`apt-get update`; run here once if
# the package or a version it names cannot be found). Idempotent: exits 0 at once when installed.
set -euo pipefail

ROOT=${HARNESS_EXIM_ROOT:-/opt/harness-exim}
PKG=exim4-daemon-light
BIN=$ROOT/usr/sbin/exim4
EXIM_USER=Debian-exim

say() { printf 'install-exim: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

have_user() { getent passwd "$EXIM_USER" >/dev/null && getent group "$EXIM_USER" >/dev/null; }

libs_ok() { # every shared library of the binary resolves
    local out
    out=$(ldd "$BIN" 2>&1) || return 1
    ! grep -q 'not found' <<<"$out"
}

installed() { [ -x "$BIN" ] && [ -f "$ROOT/.installed" ] && have_user && libs_ok; }

if installed; then
    echo "$BIN"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "run as root (apt-get, dpkg -x into $ROOT, useradd)"
if ! command -v apt-get >/dev/null || ! command -v dpkg >/dev/null; then
    die "needs a Debian system (apt-get, dpkg)"
fi
export DEBIAN_FRONTEND=noninteractive

candidate() { apt-cache policy "$PKG" 2>/dev/null | awk '/Candidate:/ {print $2}'; }
refresh_lists() {
    say "running apt-get update"
    apt-get update -qq >/dev/null || die "apt-get update failed"
}
version=$(candidate)
if [ -z "$version" ] || [ "$version" = "(none)" ]; then
    say "$PKG is not in the package lists"
    refresh_lists
    version=$(candidate)
    if [ -z "$version" ] || [ "$version" = "(none)" ]; then
        die "no package $PKG in the apt sources"
    fi
fi

# Runtime libraries: the package's own Depends on lib* packages (libc6,
# libcrypt1, libdb5.3, libgnutls30, libgnutls-dane0, libidn12, libidn2-0,
# libnsl2, libpcre2-8-0 for 4.96 on Debian 12), installed as ordinary packages.
mapfile -t libs < <(apt-cache depends --no-recommends --no-suggests --no-conflicts \
    --no-breaks --no-replaces --no-enhances "$PKG" \
    | awk '$1 ~ /^\|?Depends:$/ && $2 ~ /^lib/ {print $2}' | sort -u)
[ "${#libs[@]}" -gt 0 ] || die "could not read the dependencies of $PKG (apt-cache depends)"
missing=()
for lib in "${libs[@]}"; do
    dpkg-query -W -f='${Status}' "$lib" 2>/dev/null | grep -q 'install ok installed' \
        || missing+=("$lib")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "apt-get install ${missing[*]}"
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
        refresh_lists  # stale lists name versions the mirror no longer has
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
            || die "apt-get install ${missing[*]} failed"
    fi
fi

# The user and group the binary runs as (what exim4-base's postinst creates).
if ! getent group "$EXIM_USER" >/dev/null; then
    groupadd --system "$EXIM_USER"
fi
if ! getent passwd "$EXIM_USER" >/dev/null; then
    useradd --system --gid "$EXIM_USER" --home-dir /var/spool/exim4 --no-create-home \
        --shell /usr/sbin/nologin --comment "Exim (harness lab)" "$EXIM_USER"
fi

# Download, unpack next to $ROOT, then rename into place, so an interrupted
# run never leaves a tree that looks installed.
work=$(mktemp -d)
mkdir -p "$(dirname "$ROOT")"
stage=$(mktemp -d "$ROOT.new.XXXXXX")
trap 'rm -rf "$work" "$stage" "$ROOT.old"' EXIT
chmod 755 "$work" "$stage"
if getent passwd _apt >/dev/null; then chown _apt "$work"; fi  # apt downloads as _apt
download() { (cd "$work" && apt-get download -qq "$PKG=$version" >/dev/null); }
if ! download; then
    refresh_lists
    version=$(candidate)
    download || die "apt-get download $PKG=$version failed"
fi
deb=$(find "$work" -maxdepth 1 -name "${PKG}_*.deb" -print -quit)
[ -n "$deb" ] || die "apt-get download left no .deb"
dpkg -x "$deb" "$stage"
[ -x "$stage/usr/sbin/exim4" ] || die "$deb has no usr/sbin/exim4"
printf '%s %s\n' "$PKG" "$version" >"$stage/.installed"
rm -rf "$ROOT.old"
if [ -e "$ROOT" ]; then mv "$ROOT" "$ROOT.old"; fi
mv "$stage" "$ROOT"

libs_ok || die "$BIN: unresolved libraries: $(ldd "$BIN" | grep 'not found' | tr -s ' \t' ' ')"
# -bV reads a configuration: an empty one (all defaults) proves the binary runs
"$BIN" -C /dev/null -bV >/dev/null 2>&1 \
    || die "$BIN -bV failed: $("$BIN" -C /dev/null -bV 2>&1 | head -3)"
say "installed $PKG $version in $ROOT"
echo "$BIN"
