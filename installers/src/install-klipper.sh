#!/bin/sh
# Installs printer-connector on a Klipper host with systemd (Raspberry Pi and
# the like), as a service of the user who runs Klipper and Moonraker:
#   wget -qO- https://raw.githubusercontent.com/printdock/printer-connector/main/installers/install-klipper.sh | sudo sh
# Unattended: ... | sudo sh -s -- --pairing-token TOKEN --cloud-url URL
# Re-running it upgrades in place and keeps the pairing. --help lists the flags.
DEFAULT_REPO=printdock/printer-connector
DEFAULT_CLOUD_URL=https://www.spoolr.io
PROG=install-klipper.sh
# The release this script is an asset of (build-installers.sh --release):
# what it installs unless --version says otherwise. Empty: the latest.
RELEASE_VERSION=""
set -eu

# >>> installers/bootstrap.sh
# >>> installers/lib/common.sh

usage() {
    # shellcheck disable=SC2088  # a path for the reader, not for the shell
    install_usage "0|<hostname>|http://127.0.0.1:7125" "~/SERVICE/config.json"
    cat <<'EOT'
  --service-name NAME      service and folder name (default printer-connector),
                           for several connectors on one host
  --user NAME              the user that runs Klipper (detected from ~/printer_data)
  --no-update-manager      leave Moonraker's config alone
EOT
}

# The user who runs Klipper and Moonraker owns ~/printer_data; with one such
# folder that is the answer, else the sudo caller, else ask for --user.
detect_user() {
    if [ -n "$OPT_USER" ]; then
        SVC_USER=$OPT_USER
        HOME_DIR=$ROOT$(user_home "$OPT_USER")
        return 0
    fi
    found=""
    count=0
    for d in "$ROOT"/home/*/printer_data "$ROOT"/root/printer_data; do
        [ -d "$d" ] || continue
        found=$d
        count=$((count + 1))
    done
    if [ "$count" -eq 1 ]; then
        HOME_DIR=$(dirname "$found")
        # shellcheck disable=SC2012  # ls -ld of one known folder; BusyBox has no stat -c everywhere
        SVC_USER=$(ls -ld "$found" | awk '{ print $3 }')
    elif [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
        SVC_USER=$SUDO_USER
        HOME_DIR=$ROOT$(user_home "$SUDO_USER")
    elif [ "$count" -gt 1 ]; then
        err "several printer_data folders found; pass --user NAME (the user that runs Klipper)"
    else
        err "could not find the user that runs Klipper (no ~/printer_data); pass --user NAME"
    fi
    [ "$SVC_USER" != root ] || warn "Klipper's files belong to root here, so the service runs as root"
}

user_home() {
    h=""
    command -v getent >/dev/null 2>&1 && h=$(getent passwd "$1" | cut -d: -f6)
    [ -n "$h" ] || h=/home/$1
    printf '%s\n' "$h"
}

main() {
    init_settings
    parse_install_args "$@"
    for c in uname mktemp awk sed grep cut tr dd date sleep cmp chmod chown mv cp rm mkdir systemctl journalctl; do
        need_cmd "$c"
    done
    python_path >/dev/null
    [ "$(id -u)" -eq 0 ] || [ -n "$ROOT" ] || err "run as root (sudo): it installs a systemd service"
    lock_take
    LAYOUT=systemd
    detect_user
    DEFAULT_PRINTER_NAME=$(hostname 2>/dev/null || echo Printer)
    DIR=$HOME_DIR/$SERVICE
    # Named as the release asset: Moonraker's update manager replaces the
    # file of that name (release_info.json's asset_name).
    ASSET=printer-connector-linux-$(detect_arch)
    BIN=$DIR/$ASSET
    CONFIG=${OPT_CONFIG:-$DIR/config.json}
    make_install_dir "$DIR"
    STAGE=$(mktemp -d "$DIR/.stage.XXXXXX")
    remove_on_exit "$STAGE"
    say "installing for user $SVC_USER in $DIR (service $SERVICE)"
    install_connector "$ASSET"
}

main "$@"
