#!/bin/sh
# Installs printer-connector on a rooted Creality K1 / K1 Max (BusyBox, no
# systemd) in /usr/data/printer-connector with /etc/init.d/S99printer-connector:
#   wget -qO- http://raw.githubusercontent.com/printdock/printer-connector/main/installers/install-k1.sh | sh
# Unattended: ... | sh -s -- --pairing-token TOKEN --cloud-url URL
# Re-running it upgrades in place and keeps the pairing. --help lists the flags.
DEFAULT_REPO=printdock/printer-connector
DEFAULT_CLOUD_URL=https://www.spoolr.io
PROG=install-k1.sh
DEFAULT_PRINTER_NAME=K1
# The release this script is an asset of (build-installers.sh --release):
# what it installs unless --version says otherwise. Empty: the latest.
RELEASE_VERSION=""
set -eu

# >>> installers/bootstrap.sh
# >>> installers/lib/common.sh

usage() { install_usage "0|K1|http://127.0.0.1:7125" /usr/data/printer-connector/config.json; }

main() {
    init_settings
    parse_install_args "$@"
    if [ "$SERVICE" != printer-connector ] || [ -n "$OPT_USER" ] || [ "$UPDATE_MANAGER" != 1 ]; then
        err "--service-name, --user and --no-update-manager are for systemd hosts (install-klipper.sh)"
    fi
    UPDATE_MANAGER=0
    for c in uname mktemp awk sed grep cut tr dd date sleep chmod mv cp rm mkdir wc tail kill; do
        need_cmd "$c"
    done
    python_path >/dev/null
    [ "$(id -u)" -eq 0 ] || [ -n "$ROOT" ] || err "run as root"
    # The K1's stock wget verifies no certificate and its python3 has no CA
    # store: the first download may go unverified (said loudly); the SHA256
    # check still applies. Later updates verify TLS with the connector's CAs.
    lock_take
    ALLOW_UNVERIFIED_TLS=1
    LAYOUT=k1
    SVC_USER=""
    DIR=$ROOT/usr/data/printer-connector
    BIN=$DIR/printer-connector
    LOG=$DIR/printer-connector.log
    CONFIG=${OPT_CONFIG:-$DIR/config.json}
    make_install_dir "$DIR"
    STAGE=$(mktemp -d "$DIR/.stage.XXXXXX")
    remove_on_exit "$STAGE"
    say "installing in $DIR"
    # A static mipsle binary when the release has one that runs here, else
    # the .pyz for the printer's own python3.
    if [ "$(detect_arch)" = mipsle ]; then
        install_connector printer-connector-linux-mipsle printer-connector.pyz
    else
        install_connector printer-connector.pyz
    fi
}

main "$@"
