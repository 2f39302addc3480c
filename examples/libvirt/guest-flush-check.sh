# Run by the test guest's /init (fw_cfg opt/kvmx/script) in the example
# domain of nvdimm-flush-hint.xml: shows whether the NVDIMM has flush hints,
# makes one synced write to it, then idles so the host can read the flush
# counters (scripts/kvmx-flushstat DOMAIN).  Stop it with virsh destroy.
echo "deep_flush=$(cat /sys/bus/nd/devices/region0/deep_flush)"
dd if=/dev/urandom of=/dev/pmem0 bs=1M count=1 conv=fsync 2>/dev/null &&
    echo "synced write to /dev/pmem0 done"
echo "guest idle: read the counters on the host, then virsh destroy"
while :; do sleep 3600; done
