#!/usr/bin/env bash
# Make Fashion-MNIST available offline: Debian's package dataset-fashion-mnist where we can install it
# (root, or password-less sudo); otherwise say what to do. Idempotent, and never fails the set-up:
# the tests write their own fixtures and need no data set.
set -u
folder=/usr/share/datasets/fashion-mnist
if [ -f "$folder/train-images-idx3-ubyte.gz" ]; then
  echo "Fashion-MNIST: found in $folder"; exit 0
fi
if [ -n "${SK_DATA:-}" ] && ls "$SK_DATA"/train-images-idx3-ubyte* "$SK_DATA"/fashion-mnist/train-images-idx3-ubyte* \
     "$SK_DATA"/FashionMNIST/raw/train-images-idx3-ubyte* >/dev/null 2>&1; then
  echo "Fashion-MNIST: found under \$SK_DATA=$SK_DATA"; exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then sudo_cmd=""; elif sudo -n true 2>/dev/null; then sudo_cmd="sudo -n"; else sudo_cmd=none; fi
  if [ "$sudo_cmd" != none ]; then
    echo "Fashion-MNIST: installing Debian's dataset-fashion-mnist"
    $sudo_cmd apt-get update -qq >/dev/null 2>&1 || true
    if DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
       && [ -f "$folder/train-images-idx3-ubyte.gz" ]; then
      echo "Fashion-MNIST: installed in $folder"; exit 0
    fi
  fi
fi
cat <<MSG
Fashion-MNIST: not installed (the tests do not need it; the experiments do). Do one of:
  sudo apt-get install dataset-fashion-mnist                 # Debian / Ubuntu
  export SK_DATA=/path/with/the/four/*-ubyte.gz/files         # any machine
  python experiments/run.py ... data.download=true            # with network: torchvision downloads it
MSG
exit 0
