#!/usr/bin/env bash
# install-criu.sh: make a working CRIU (>= 4.1) available and print its path as the last line.
#
# Debian 12's criu 3.17.1 fails on recent kernels ("vdso: Unexpected rt vDSO area bounds", fixed in
# CRIU 4.1). If no criu on PATH passes `criu check`, this installs Debian 13 (trixie)'s criu and the
# runtime libraries it needs into a private prefix (default /opt/onebox/criu) with `dpkg -x`, and
# writes PREFIX/bin/criu, a wrapper that runs the real binary through the prefix's own dynamic loader.
# Nothing about the system's apt configuration, package lists or libc changes: apt runs with a
# private, throw-away configuration and state directory, reusing the Debian mirror host that this
# machine's apt sources already name. It also raises fs.pipe-max-size to at least 8 MiB (CRIU's
# lazy-pages/post-copy dump needs big pipes). Idempotent; quiet on success.
#
# Environment:
#   ONEBOX_CRIU_PREFIX     install prefix (default /opt/onebox/criu)
#   ONEBOX_CRIU_SUITE      Debian suite to take criu from (default trixie)
#   ONEBOX_DEBIAN_MIRROR   Debian mirror URI (default: the one this machine's apt sources use)
#   ONEBOX_NET_TIMEOUT     seconds allowed for each network step (default 300)
#   ONEBOX_VERBOSE=1       report progress on stderr
set -euo pipefail

PREFIX=${ONEBOX_CRIU_PREFIX:-/opt/onebox/criu}
SUITE=${ONEBOX_CRIU_SUITE:-trixie}
NET_TIMEOUT=${ONEBOX_NET_TIMEOUT:-300}
CHECK_TIMEOUT=120
MIN_PIPE_MAX=8388608
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

die() {
	echo "install-criu: error: $*" >&2
	exit 1
}
info() {
	if [[ ${ONEBOX_VERBOSE:-} == 1 ]]; then echo "install-criu: $*" >&2; fi
	return 0
}

# criu_version BIN: prints "MAJOR MINOR" from `BIN --version` ("Version: 4.1.1").
criu_version() {
	timeout "$CHECK_TIMEOUT" "$1" --version 2>/dev/null |
		sed -n 's/^Version:[[:space:]]*\([0-9][0-9]*\)\.\([0-9][0-9]*\).*/\1 \2/p' | head -n1
}

# criu_works BIN: true if BIN is CRIU >= 4.1 and `BIN check` exits 0.
criu_works() {
	local bin=$1 ver major minor
	[[ -x $bin ]] || return 1
	ver=$(criu_version "$bin") || return 1
	read -r major minor <<<"$ver" || return 1
	[[ -n ${major:-} ]] || return 1
	((major > 4 || (major == 4 && minor >= 1))) || {
		info "$bin is CRIU $major.$minor; need >= 4.1"
		return 1
	}
	timeout "$CHECK_TIMEOUT" "$bin" check >/dev/null 2>&1
}

raise_pipe_max() {
	local cur
	cur=$(cat /proc/sys/fs/pipe-max-size)
	if ((cur < MIN_PIPE_MAX)); then
		sysctl -q -w "fs.pipe-max-size=$MIN_PIPE_MAX" >/dev/null 2>&1 ||
			die "cannot raise fs.pipe-max-size from $cur to $MIN_PIPE_MAX (run as root); CRIU lazy-pages dumps need it"
		info "raised fs.pipe-max-size from $cur to $MIN_PIPE_MAX"
	fi
}

# debian_mirror: the URI of the main Debian archive in this machine's apt sources, i.e. the entry
# whose suite is this system's codename (one-line .list files and deb822 .sources files).
debian_mirror() {
	if [[ -n ${ONEBOX_DEBIAN_MIRROR:-} ]]; then
		echo "$ONEBOX_DEBIAN_MIRROR"
		return
	fi
	local codename files=() f
	codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
	[[ -n $codename ]] || die "cannot tell this system's Debian codename from /etc/os-release"
	shopt -s nullglob
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do [[ -f $f ]] && files+=("$f"); done
	local uri=""
	if ((${#files[@]})); then
		# deb [opts] URI SUITE COMPONENTS...
		uri=$(awk -v s="$codename" '
			$1 == "deb" {
				i = 2
				if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
				if ($(i+1) == s) { print $i; exit }
			}' "${files[@]}")
	fi
	if [[ -z $uri ]]; then
		for f in /etc/apt/sources.list.d/*.sources; do
			uri=$(awk -v s="$codename" '
				function flush() {
					if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " s " ") && enabled != "no" && uris != "") {
						split(uris, u, " "); print u[1]; found = 1; exit
					}
					types = ""; suites = ""; uris = ""; enabled = ""
				}
				/^[[:space:]]*#/ { next }
				/^[[:space:]]*$/ { flush(); next }
				{
					k = tolower($1); v = $0; sub(/^[^:]*:[[:space:]]*/, "", v)
					if (k == "types:") types = v
					else if (k == "suites:") suites = v
					else if (k == "uris:") uris = v
					else if (k == "enabled:") enabled = tolower(v)
				}
				END { if (!found) flush() }' "$f")
			[[ -n $uri ]] && break
		done
	fi
	shopt -u nullglob
	[[ -n $uri ]] || die "no apt source for suite '$codename' in /etc/apt/sources.list{,.d}; set ONEBOX_DEBIAN_MIRROR"
	echo "${uri%/}"
}

install_private() {
	[[ $(id -u) == 0 ]] || die "no working criu found and installing one into $PREFIX needs root"
	local tool
	for tool in apt-get apt-cache apt-config dpkg timeout; do
		command -v "$tool" >/dev/null || die "$tool not found (this installer needs a Debian-based system)"
	done
	[[ -r $KEYRING ]] || die "$KEYRING missing: install debian-archive-keyring"

	local mirror arch work
	mirror=$(debian_mirror)
	arch=$(dpkg --print-architecture)
	info "installing criu from $mirror $SUITE ($arch) into $PREFIX"

	work=$(mktemp -d "${TMPDIR:-/tmp}/onebox-criu.XXXXXX")
	local stage="$PREFIX.new.$$"
	# shellcheck disable=SC2064
	trap "rm -rf '$work' '$stage'" EXIT
	mkdir -p "$work/etc/apt.conf.d" "$work/etc/sources.list.d" "$work/etc/preferences.d" \
		"$work/state/lists/partial" "$work/cache/archives/partial" "$work/log" "$work/debs"

	# Settings of the system's apt that the download needs (proxies, snapshot mirrors), read at run time.
	local carried="" key val
	for key in Acquire::http::Proxy Acquire::https::Proxy Acquire::Check-Valid-Until Acquire::Check-Date; do
		val=$(apt-config dump "$key" 2>/dev/null | sed -n "s|^$key \"\\(.*\\)\";\$|\\1|p" | head -n1)
		[[ -n $val ]] && carried+="$key \"$val\";"$'\n'
	done

	echo "deb [arch=$arch signed-by=$KEYRING] $mirror $SUITE main" >"$work/etc/sources.list"
	# A private configuration: none of the system's apt.conf.d, sources, preferences, lists or dpkg
	# status are read or written, so its hooks do not run and the system's apt state is unchanged.
	cat >"$work/apt.conf" <<EOF
Dir::Etc "$work/etc/";
Dir::Etc::main "/dev/null";
Dir::Etc::parts "apt.conf.d";
Dir::Etc::sourcelist "sources.list";
Dir::Etc::sourceparts "sources.list.d";
Dir::Etc::preferences "/dev/null";
Dir::Etc::preferencesparts "preferences.d";
Dir::State "$work/state/";
Dir::State::status "/dev/null";
Dir::Cache "$work/cache/";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Dir::Log "$work/log/";
APT::Architecture "$arch";
APT::Architectures { "$arch"; };
APT::Sandbox::User "root";
Acquire::Languages "none";
$carried
EOF
	export APT_CONFIG="$work/apt.conf"

	local log="$work/apt.log"
	if ! timeout "$NET_TIMEOUT" apt-get -q update >"$log" 2>&1 || grep -q '^E:' "$log"; then
		cat "$log" >&2
		die "apt-get update of $mirror $SUITE failed or timed out (${NET_TIMEOUT}s)"
	fi

	local candidate
	candidate=$(apt-cache show --no-all-versions criu 2>/dev/null | sed -n 's/^Version: //p' | head -n1)
	[[ -n $candidate ]] || die "no criu package in $mirror $SUITE"
	[[ $candidate =~ ^([0-9]+:)?([0-9]+)\.([0-9]+) ]] || die "cannot parse criu version '$candidate'"
	((BASH_REMATCH[2] > 4 || (BASH_REMATCH[2] == 4 && BASH_REMATCH[3] >= 1))) ||
		die "$SUITE has criu $candidate; need >= 4.1"

	# The dependency closure of criu (Depends/Pre-Depends only) against an empty dpkg status: every
	# library comes from the same suite, libc and loader included, none from the system.
	local pkgs
	pkgs=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
		--no-replaces --no-enhances criu | grep -v '^[[:space:]<]' | sort -u)
	[[ -n $pkgs ]] || die "cannot resolve the dependencies of criu"
	info "packages: $(echo $pkgs)"

	# shellcheck disable=SC2086
	if ! (cd "$work/debs" && timeout "$NET_TIMEOUT" apt-get -q download $pkgs >"$log" 2>&1); then
		cat "$log" >&2
		die "downloading criu and its libraries failed or timed out (${NET_TIMEOUT}s)"
	fi
	info "downloaded $(du -cb "$work"/debs/*.deb | tail -n1 | cut -f1) bytes: $(cd "$work/debs" && echo *.deb)"

	# Unpack into a staging directory beside PREFIX, check it, then swap it in.
	local deb
	mkdir -p "$(dirname "$PREFIX")"
	rm -rf "$stage"
	mkdir -p "$stage"
	for deb in "$work"/debs/*.deb; do
		dpkg -x "$deb" "$stage" || die "dpkg -x $deb failed"
	done
	[[ -x $stage/usr/sbin/criu ]] || die "the criu package did not contain usr/sbin/criu"

	local loader libdirs="" d
	loader=$(cd "$stage" && ls usr/lib/*/ld-linux*.so.* 2>/dev/null | head -n1 || true)
	[[ -n $loader ]] || die "no dynamic loader (usr/lib/*/ld-linux*.so.*) in the unpacked libc6"
	for d in "$(dirname "$loader")" lib/"$(basename "$(dirname "$loader")")" usr/lib lib; do
		if [[ -d $stage/$d ]]; then libdirs+="${libdirs:+:}\$root/$d"; fi
	done

	mkdir -p "$stage/bin"
	cat >"$stage/bin/criu" <<EOF
#!/bin/sh
# Written by onebox scripts/install-criu.sh: runs Debian $SUITE's criu $candidate with the loader and
# libraries unpacked beside it, so the system's libc is neither used nor changed.
root=\$(cd "\$(dirname "\$(readlink -f "\$0")")/.." && pwd) || exit 127
exec "\$root/$loader" --library-path "$libdirs" --argv0 "\$0" "\$root/usr/sbin/criu" "\$@"
EOF
	chmod 0755 "$stage/bin/criu"

	local out
	if ! out=$(timeout "$CHECK_TIMEOUT" "$stage/bin/criu" check 2>&1) || ! grep -q 'Looks good' <<<"$out"; then
		echo "$out" >&2
		die "criu $candidate from $SUITE does not pass 'criu check' on this kernel ($(uname -r))"
	fi

	if [[ -e $PREFIX ]]; then
		rm -rf "$PREFIX.old.$$"
		mv "$PREFIX" "$PREFIX.old.$$"
	fi
	mv "$stage" "$PREFIX"
	rm -rf "$PREFIX.old.$$"
	info "installed criu $candidate in $PREFIX"
}

main() {
	local found=""
	local path_criu
	path_criu=$(command -v criu 2>/dev/null || true)
	if [[ -n $path_criu ]] && criu_works "$path_criu"; then
		found=$path_criu
	elif criu_works "$PREFIX/bin/criu"; then
		found=$PREFIX/bin/criu
	else
		install_private
		criu_works "$PREFIX/bin/criu" || die "$PREFIX/bin/criu was installed but does not work"
		found=$PREFIX/bin/criu
	fi
	raise_pipe_max
	echo "$found"
}

main "$@"
