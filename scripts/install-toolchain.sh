#!/usr/bin/env bash
# Installs the Debian packages distillc's backend uses (arm-none-eabi-gcc, newlib, QEMU) and the
# headless browser the report test opens bundle/report.html in (chromium) when any is missing.
# Needs root for apt-get; without it, says what to install and carries on.
set -euo pipefail

missing=()
command -v arm-none-eabi-gcc >/dev/null 2>&1 || missing+=(gcc-arm-none-eabi)
if command -v arm-none-eabi-gcc >/dev/null 2>&1; then
  lib=$(arm-none-eabi-gcc -print-file-name=librdimon.a)
  [ -f "$lib" ] || missing+=(libnewlib-arm-none-eabi)
else
  missing+=(libnewlib-arm-none-eabi)
fi
command -v qemu-system-arm >/dev/null 2>&1 || missing+=(qemu-system-arm)
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v gcc >/dev/null 2>&1 || missing+=(gcc)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "distillc: missing Debian packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})" >&2
  exit 0
fi
echo "distillc: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}" >/dev/null
