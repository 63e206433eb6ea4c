#!/usr/bin/env bash
# Installs flotilla as a systemd service, in one command (like K3s's install script):
#
#   scripts/install.sh hub [--listen ADDR] [OPTIONS] [-- HUB_FLAGS...]
#   scripts/install.sh agent --hub HOST:PORT (--token-file FILE | --token TOKEN) [--name N] [OPTIONS] [-- AGENT_FLAGS...]
#
# It installs the binary as /usr/local/bin/flotilla, writes /etc/flotilla/{hub,agent}.yaml
# (the service's config file: the options above, keys named as the flags; edit it and restart
# the unit to change them), /etc/flotilla/{hub,agent}.env (the flags after `--`, which
# override the file's keys) and, for an agent, the join token as /etc/flotilla/token (0600), installs
# deploy/systemd/flotilla-{hub,agent}.service into /etc/systemd/system/ and, when systemd is
# running, `systemctl daemon-reload && systemctl enable --now` the unit.
#
# Options:
#   --binary PATH   the flotilla binary to install (default: the repo's target/release, then
#                   target/debug build, also under $CARGO_TARGET_DIR)
#   --root DIR      install under DIR instead of / (a staged install: systemctl is not run)
#   --dry-run       print what would be done, change nothing
#   -h, --help      this text
#
# Flags after `--` are added to the service's command line (e.g. `-- --containers on`);
# none may contain whitespace or quotes (the unit splits its flags on whitespace).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() {
    echo "install.sh: error: $*" >&2
    exit 1
}

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

ROLE=
LISTEN=
HUB=
TOKEN=
TOKEN_FILE=
NAME=
BINARY=
DEST=
DRY_RUN=0
EXTRA=()

[[ $# -gt 0 ]] || { usage >&2; exit 2; }
case $1 in
    hub | agent) ROLE=$1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "the first argument must be 'hub' or 'agent', not '$1' (see --help)" ;;
esac

# The value of option $1, which must be there.
need() {
    [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"
}

while [[ $# -gt 0 ]]; do
    case $1 in
        --listen) need "$@"; LISTEN=$2; shift 2 ;;
        --hub) need "$@"; HUB=$2; shift 2 ;;
        --token) need "$@"; TOKEN=$2; shift 2 ;;
        --token-file) need "$@"; TOKEN_FILE=$2; shift 2 ;;
        --name) need "$@"; NAME=$2; shift 2 ;;
        --binary) need "$@"; BINARY=$2; shift 2 ;;
        --root) need "$@"; DEST=$2; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) die "unknown option '$1' for '$ROLE' (see --help)" ;;
    esac
done

case $ROLE in
    hub)
        [[ -z $HUB$TOKEN$TOKEN_FILE$NAME ]] || die "--hub, --token, --token-file and --name are for 'agent', not 'hub'"
        ;;
    agent)
        [[ -z $LISTEN ]] || die "--listen is for 'hub', not 'agent'"
        [[ -n $HUB ]] || die "agent needs --hub HOST:PORT"
        [[ $HUB == *:* ]] || die "--hub must be HOST:PORT, not '$HUB'"
        [[ -n $TOKEN || -n $TOKEN_FILE ]] || die "agent needs --token-file FILE or --token TOKEN (the hub's join token)"
        [[ -z $TOKEN || -z $TOKEN_FILE ]] || die "give --token or --token-file, not both"
        if [[ -n $TOKEN_FILE ]]; then
            [[ -r $TOKEN_FILE ]] || die "cannot read the token file '$TOKEN_FILE'"
        fi
        ;;
esac

# Flags go into an EnvironmentFile and are split on whitespace by systemd: refuse what would
# not survive that.
for arg in "$LISTEN" "$HUB" "$NAME" "${EXTRA[@]}"; do
    [[ $arg != *[[:space:]\"\'\\\$]* ]] || die "'$arg' has whitespace, a quote, a backslash or a \$, which the unit cannot pass on"
done

if [[ -z $BINARY ]]; then
    for dir in "${CARGO_TARGET_DIR:-}" "$REPO/target"; do
        [[ -n $dir ]] || continue
        for profile in release debug; do
            if [[ -x $dir/$profile/flotilla ]]; then
                BINARY=$dir/$profile/flotilla
                break 2
            fi
        done
    done
    [[ -n $BINARY ]] || die "no flotilla binary under $REPO/target/{release,debug}: run 'cargo build --release' or give --binary PATH"
fi
[[ -f $BINARY && -x $BINARY ]] || die "--binary '$BINARY' is not an executable file"

UNIT=flotilla-$ROLE.service
UNIT_SRC=$REPO/deploy/systemd/$UNIT
[[ -f $UNIT_SRC ]] || die "missing unit file $UNIT_SRC"

# Without --root the install is for this machine, and only systemd can run it: like K3s,
# refuse before touching anything rather than leave a service nothing starts.
SYSTEMD=0
if [[ -z $DEST ]]; then
    [[ $(id -u) -eq 0 || $DRY_RUN -eq 1 ]] || die "run as root (or with --dry-run, or --root DIR for a staged install)"
    if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
        SYSTEMD=1
    elif [[ $DRY_RUN -eq 0 ]]; then
        die "systemd is not running here (no /run/systemd/system): nothing installed; use --dry-run to see what would be done, or --root DIR to stage the files"
    fi
fi

# Runs a command, or prints it under --dry-run.
run() {
    if [[ $DRY_RUN -eq 1 ]]; then
        echo "would run: $*"
    else
        "$@"
    fi
}

# write_file PATH MODE CONTENT: writes CONTENT (plus a newline) to PATH with MODE.
write_file() {
    if [[ $DRY_RUN -eq 1 ]]; then
        echo "would write $1 (mode $2):"
        # A token is not echoed.
        if [[ $1 == */token ]]; then echo "    <join token>"; else printf '%s\n' "$3" | sed 's/^/    /'; fi
        return
    fi
    local tmp
    tmp=$(mktemp "$1.XXXXXX")
    printf '%s\n' "$3" >"$tmp"
    chmod "$2" "$tmp"
    mv -f "$tmp" "$1"
}

ETC=$DEST/etc/flotilla
run install -d -m 0755 "$DEST/usr/local/bin" "$DEST/etc/systemd/system"
run install -d -m 0700 "$ETC"
run install -m 0755 "$BINARY" "$DEST/usr/local/bin/flotilla"

# The header of a service's config file.
config_header() {
    echo "# /etc/flotilla/$1.yaml: the config file of 'flotilla $1', read at each start. Keys are
# its long flags without the dashes ('flotilla $1 --help'), e.g. label: [site=a, tier=edge];
# flags in /etc/flotilla/$1.env override them. Written by scripts/install.sh."
}

case $ROLE in
    hub)
        write_file "$ETC/hub.yaml" 0600 "$(config_header hub)
listen: '${LISTEN:-0.0.0.0:7443}'"
        write_file "$ETC/hub.env" 0600 "# Flags of 'flotilla hub' over /etc/flotilla/hub.yaml, written by scripts/install.sh.
FLOTILLA_HUB_ARGS=\"${EXTRA[*]}\""
        ;;
    agent)
        if [[ -n $TOKEN_FILE ]]; then
            TOKEN=$(<"$TOKEN_FILE")
        fi
        [[ -n ${TOKEN//[[:space:]]/} ]] || die "the join token is empty"
        write_file "$ETC/token" 0600 "$TOKEN"
        CONFIG="$(config_header agent)
hub: '$HUB'
token-file: /etc/flotilla/token"
        [[ -z $NAME ]] || CONFIG+="
name: '$NAME'"
        write_file "$ETC/agent.yaml" 0600 "$CONFIG"
        write_file "$ETC/agent.env" 0600 "# Flags of 'flotilla agent' over /etc/flotilla/agent.yaml, written by scripts/install.sh.
FLOTILLA_AGENT_ARGS=\"${EXTRA[*]}\""
        ;;
esac
run install -m 0644 "$UNIT_SRC" "$DEST/etc/systemd/system/$UNIT"

if [[ $SYSTEMD -eq 1 ]]; then
    run systemctl daemon-reload
    run systemctl enable --now "$UNIT"
    if [[ $DRY_RUN -eq 0 ]]; then
        echo "flotilla $ROLE installed and started: systemctl status $UNIT; journalctl -u $UNIT"
    fi
else
    echo "not starting $UNIT: $(if [[ -n $DEST ]]; then echo "staged under $DEST"; else echo "systemd is not running here"; fi)."
    echo "On the target machine run: systemctl daemon-reload && systemctl enable --now $UNIT"
fi
if [[ $ROLE == hub && $DRY_RUN -eq 0 && $SYSTEMD -eq 1 ]]; then
    echo "the join token and admin config are in /var/lib/flotilla/hub/ once the hub has started"
fi
