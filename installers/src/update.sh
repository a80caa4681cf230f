#!/bin/sh
# Updates printer-connector (installed by install-klipper.sh or install-k1.sh,
# or by the older Go connector's installers) to the latest release:
#   wget -qO- https://raw.githubusercontent.com/printdock/printer-connector/main/installers/update.sh | sudo sh
# Verifies the checksum, refuses while a print runs, keeps two backups and
# rolls back by itself when the new version sends no heartbeat.
DEFAULT_REPO=printdock/printer-connector
PROG=update.sh
# The release this script is an asset of (build-installers.sh --release):
# what it installs unless --version says otherwise. Empty: the latest.
RELEASE_VERSION=""
set -eu

# >>> installers/bootstrap.sh
# >>> installers/lib/common.sh

usage() {
    cat <<'EOT'
usage: update.sh [options]
  (none)                update to the latest release
  --version X.Y.Z       update (or go back) to this release
  --check               only report the installed and the latest version
  --rollback            put back the previous binary (kept in backups/)
  --doctor              check that the binary, release_info.json and the
                        service agree (after updates through Moonraker)
  --force               update even while a print is running
  --service-name NAME   the systemd service (default printer-connector)
EOT
}

# The Go connector on a K1 ran from /opt/printer-connector with an init
# script of its own. Switch to our layout, keeping its paired config; the
# install steps are the installer's, with no new pairing.
migrate_legacy_k1() {
    CONFIG_FROM=$CONFIG
    say "found the Go connector ($BIN, $LEGACY_INIT): switching to this connector, keeping its pairing"
    # Its install had no CA bundle: same as a first install on a K1.
    ALLOW_UNVERIFIED_TLS=1
    DIR=$ROOT/usr/data/printer-connector
    BIN=$DIR/printer-connector
    LOG=$DIR/printer-connector.log
    CONFIG=$DIR/config.json
    make_install_dir "$DIR"
    STAGE=$(mktemp -d "$DIR/.stage.XXXXXX")
    remove_on_exit "$STAGE"
    TOKEN=""
    OPT_BIN=""
    LOG_LEVEL=info
    if [ "$(detect_arch)" = mipsle ]; then
        install_connector printer-connector-linux-mipsle printer-connector.pyz
    else
        install_connector printer-connector.pyz
    fi
    say "the old files in $(dirname "$CONFIG_FROM") can be deleted"
}

main() {
    init_settings
    MODE=update
    OPT_VERSION=$RELEASE_VERSION
    FORCE=0
    while [ $# -gt 0 ]; do
        case $1 in
            --version) need_arg "$@"; OPT_VERSION=$2; shift ;;
            --check) MODE=check ;;
            --rollback) MODE=rollback ;;
            --doctor) MODE=doctor ;;
            --force) FORCE=1 ;;
            --service-name) need_arg "$@"; SERVICE=$2; shift ;;
            -h | --help) usage; exit 0 ;;
            *) usage >&2; err "unknown option: $1" ;;
        esac
        shift
    done
    for c in mktemp awk sed grep cut tr dd date sleep chmod mv cp rm mkdir; do
        need_cmd "$c"
    done
    python_path >/dev/null
    lock_take
    detect_install || err "no printer-connector installation found (looked for $(unit_path) and $K1_INIT)"
    if [ "$LAYOUT" = k1 ] && [ -z "$CA_BUNDLE" ] && [ -f "$DIR/ca-bundle.pem" ]; then
        CA_BUNDLE=$DIR/ca-bundle.pem
    fi
    if [ -n "$LEGACY_INIT" ]; then
        [ "$MODE" = update ] || err "--$MODE works once the Go connector is replaced: run update.sh without options first"
        migrate_legacy_k1
        return 0
    fi
    STAGE=$(mktemp -d "$DIR/.stage.XXXXXX")
    remove_on_exit "$STAGE"
    case $MODE in update | rollback) recover_interrupted ;; esac
    CURRENT_VERSION=$(bin_version "$BIN" || true)
    case $MODE in
        check) do_check ;;
        doctor) do_doctor ;;
        rollback) do_rollback ;;
        update) do_update ;;
    esac
}

main "$@"
