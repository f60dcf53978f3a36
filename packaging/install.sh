#!/bin/sh
# FlashDesk (portable Linux build): put a launcher in your applications menu, without root.
#
#   ./install.sh              menu entry + icon for this folder's FlashDesk, and ~/.local/bin/flashdesk
#   ./install.sh --uninstall  remove them again (this folder is left as it is)
#
# Nothing is copied: the menu entry starts the app from this folder, so keep the folder where it
# is (or run install.sh again after moving it). Files written: $XDG_DATA_HOME (default
# ~/.local/share)/applications/flashdesk.desktop, .../icons/hicolor/{scalable,256x256}/apps/
# flashdesk.{svg,png}, and the link ~/.local/bin/flashdesk.
set -eu

here=$(cd "$(dirname "$0")" && pwd -P)
data_home=${XDG_DATA_HOME:-$HOME/.local/share}
apps="$data_home/applications"
icons="$data_home/icons/hicolor"
bin_dir="$HOME/.local/bin"
entry="$apps/flashdesk.desktop"
assets="$here/_internal/flashdesk/assets"

refresh_caches() {
    if command -v update-desktop-database >/dev/null 2>&1; then
        update-desktop-database -q "$apps" 2>/dev/null || true
    fi
    if command -v gtk-update-icon-cache >/dev/null 2>&1; then
        gtk-update-icon-cache -q -t "$icons" 2>/dev/null || true
    fi
}

if [ "${1:-}" = "--uninstall" ]; then
    rm -f "$entry" "$icons/scalable/apps/flashdesk.svg" "$icons/256x256/apps/flashdesk.png"
    if [ -L "$bin_dir/flashdesk" ] && [ "$(readlink "$bin_dir/flashdesk")" = "$here/flashdesk" ]; then
        rm -f "$bin_dir/flashdesk"
    fi
    refresh_caches
    echo "FlashDesk's menu entry and icon are removed. Delete this folder to remove the app itself."
    exit 0
fi
if [ $# -gt 0 ]; then
    echo "install.sh: unknown option '$1'. Use no option to install the menu entry, or --uninstall." >&2
    exit 2
fi

if [ ! -x "$here/flashdesk" ] || [ ! -f "$assets/flashdesk.desktop" ]; then
    echo "install.sh: this folder is not a complete FlashDesk build (missing $here/flashdesk or" \
        "its _internal folder). Unpack the whole tarball again and run install.sh from it." >&2
    exit 1
fi
case "$here" in
*'"'* | *'`'* | *'$'* | *'\'* | *'%'*)
    echo "install.sh: the folder path '$here' contains a character (\" \` \$ \\ %) that a menu" \
        "entry cannot hold. Move the FlashDesk folder to a plainer path and run install.sh again." >&2
    exit 1
    ;;
esac

mkdir -p "$apps" "$icons/scalable/apps" "$icons/256x256/apps" "$bin_dir"
cp "$assets/flashdesk.svg" "$icons/scalable/apps/flashdesk.svg"
cp "$assets/flashdesk.png" "$icons/256x256/apps/flashdesk.png"
# The shipped entry, pointed at this folder's executable (quoted: the path may hold spaces).
sed -e "s|^Exec=.*|Exec=\"$here/flashdesk\"|" \
    -e "s|^TryExec=.*|TryExec=$here/flashdesk|" \
    -e "s|^Icon=.*|Icon=flashdesk|" \
    "$assets/flashdesk.desktop" >"$entry.tmp"
mv "$entry.tmp" "$entry"
chmod 644 "$entry"
ln -sfn "$here/flashdesk" "$bin_dir/flashdesk"
refresh_caches

echo "FlashDesk is in your applications menu (entry: $entry)."
case ":${PATH:-}:" in
*":$bin_dir:"*) echo "In a terminal, run: flashdesk" ;;
*) echo "In a terminal, run: $bin_dir/flashdesk (add $bin_dir to PATH to type just flashdesk)" ;;
esac
