#!/bin/sh
# Removes printer-connector (either layout): stops and removes the service and
# its Moonraker entries, then the install folder. Never touches printer_data
# or Klipper.
#   wget -qO- https://raw.githubusercontent.com/printdock/printer-connector/main/installers/uninstall.sh | sudo sh -s -- --yes
#
# This file only starts installers/bootstrap.sh, fetched from beside it as
# this file was (curl, else wget: BusyBox's on a K1, within a minute); that
# runs uninstall.sh as a release publishes it, checked against the release's
# SHA256SUMS. The source of uninstall.sh: installers/src/ and installers/lib/.
# (Every failure here is handled where it happens, hence no set -e.)

main() {
    url=${PRINTER_CONNECTOR_BOOTSTRAP_URL:-https://raw.githubusercontent.com/printdock/printer-connector/main/installers/bootstrap.sh} && boot=$(mktemp) && trap 'rm -f "$boot"' EXIT
    if command -v curl >/dev/null 2>&1; then curl -fsSL --max-time 60 -o "$boot" "$url"; else timeout 60 wget -qO "$boot" "$url"; fi || { echo "uninstall.sh: error: could not download $url" >&2; exit 1; }
    sh "$boot" uninstall.sh "$@" </dev/null
}

main "$@"
