#!/bin/sh
# Removes printer-connector (either layout): stops and removes the service and
# its Moonraker entries, then the install folder. Never touches printer_data
# or Klipper.
#   wget -qO- https://raw.githubusercontent.com/printdock/printer-connector/main/installers/uninstall.sh | sudo sh -s -- --yes
DEFAULT_REPO=printdock/printer-connector
PROG=uninstall.sh
set -eu

# >>> installers/bootstrap.sh
# >>> installers/lib/common.sh

usage() {
    cat <<'EOT'
usage: uninstall.sh [options]
  --yes                 do not ask
  --config-only         remove the service and the configuration (the
                        pairing) but keep the binary and its backups
  --service-name NAME   the systemd service (default printer-connector)
EOT
}

main() {
    init_settings
    YES=0
    CONFIG_ONLY=0
    while [ $# -gt 0 ]; do
        case $1 in
            --yes | -y) YES=1 ;;
            --config-only) CONFIG_ONLY=1 ;;
            --service-name) need_arg "$@"; SERVICE=$2; shift ;;
            -h | --help) usage; exit 0 ;;
            *) usage >&2; err "unknown option: $1" ;;
        esac
        shift
    done
    for c in sed grep rm; do
        need_cmd "$c"
    done
    python_path >/dev/null
    lock_take
    detect_install || err "no printer-connector installation found (looked for $(unit_path) and $K1_INIT)"
    do_uninstall
}

main "$@"
