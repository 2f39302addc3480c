# Run by the test guest's /init (fw_cfg opt/kvmx/script) in the example
# domain of hostd-protected.xml: loads the kvmx-chan guest driver and makes
# a protected page be written once (kvmx-prottest signal), which QEMU
# reports as KVMX_VIOLATION; kvmx-hostd, following the domain through
# libvirt, records it:
#   kvmx-hostctl violations vm=kvmx-protected
# Then it idles.  Stop it with virsh destroy.
insmod /opt/kvmx/kvmx_guest.ko || echo "insmod kvmx_guest.ko failed"
/opt/kvmx/kvmx-prottest signal
echo "kvmx-prottest signal: exit $?"
echo "guest idle: ask hostd for the violations, then virsh destroy"
while :; do sleep 3600; done
