#!/bin/sh
# Writes small valid images into corpus/<target>/ as seeds for the fuzz targets: with
# 4 KiB clusters they fit in libFuzzer's -max_len. Run from fuzz/ after building qed.
set -eu
qed=$(realpath "${QED:-../target/debug/qed}")
out=$(pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
truncate -s 1M base.raw
"$qed" create -f qed -o cluster_size=4k,table_size=1 empty.qed 1M >/dev/null
"$qed" create -f qed -o cluster_size=4k,table_size=1 data.qed 4M >/dev/null
"$qed" io -c "write -P 0xab 100 3000" -c "write 8k 5k" -c "write 2M 4k" -c "write -z 12k 8k" \
    data.qed >/dev/null
"$qed" create -f qed -o cluster_size=4k,table_size=2 -b base.raw -F raw backed.qed 2M >/dev/null
"$qed" io -c "write 4k 4k" -c "write -z 16k 8k" -c "write 1M 100" backed.qed >/dev/null
# NEED_CHECK set, a leaked cluster at the end and a partial one after it.
cp data.qed dirty.qed
printf '\002' | dd of=dirty.qed bs=1 seek=16 conv=notrunc 2>/dev/null
head -c 5000 /dev/zero | tr '\0' '\167' >>dirty.qed
for t in open_image check; do
    mkdir -p "$out/corpus/$t"
    cp ./*.qed "$out/corpus/$t/"
done
