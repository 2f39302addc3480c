"""Two network namespaces joined by a veth pair whose bandwidth is capped,
for migrations that cross a real (if virtual) link: the source QEMU runs in
one namespace, the destination in the other, and the kernel's token bucket
(tc tbf) on each end holds the link to the rate a test asks for.

    with netns.CappedLink(mbit=400, delay_ms=1) as link:
        src = kvmxvm.start_guest(..., prefix=link.src_exec)
        dst = kvmxvm.start_guest(..., prefix=link.dst_exec)
        uri = f"tcp:{link.dst_ip}:4444"

Needs root and iproute2 (ip, tc); `CappedLink.unavailable()` says why not.
"""
import os
import shutil
import subprocess
import uuid


def _run(*cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r.stdout


class CappedLink:
    SRC_IP, DST_IP = "10.231.77.1", "10.231.77.2"

    def __init__(self, mbit, delay_ms=0.0):
        tag = uuid.uuid4().hex[:6]
        self.mbit = mbit
        self.delay_ms = delay_ms
        self.src_ns, self.dst_ns = f"kvmx-s-{tag}", f"kvmx-d-{tag}"
        self._veth = (f"kvs{tag}", f"kvd{tag}")
        self.src_ip, self.dst_ip = self.SRC_IP, self.DST_IP
        self.src_exec = ["ip", "netns", "exec", self.src_ns]
        self.dst_exec = ["ip", "netns", "exec", self.dst_ns]

    @staticmethod
    def unavailable():
        """None if a link can be made here, else the reason."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        for tool in ("ip", "tc"):
            if not shutil.which(tool):
                return f"{tool} (iproute2) is not installed"
        return None

    def __enter__(self):
        a, b = self._veth
        try:
            _run("ip", "netns", "add", self.src_ns)
            _run("ip", "netns", "add", self.dst_ns)
            _run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
            for dev, ns, ip in ((a, self.src_ns, self.src_ip),
                                (b, self.dst_ns, self.dst_ip)):
                _run("ip", "link", "set", dev, "netns", ns)
                x = ["ip", "netns", "exec", ns]
                _run(*x, "ip", "addr", "add", f"{ip}/24", "dev", dev)
                _run(*x, "ip", "link", "set", dev, "up")
                _run(*x, "ip", "link", "set", "lo", "up")
                # Both directions are capped: pages one way, requests the
                # other.  A netem delay (if asked) sits under the bucket.
                if self.delay_ms:
                    _run(*x, "tc", "qdisc", "add", "dev", dev, "root",
                         "handle", "1:", "netem", "delay",
                         f"{self.delay_ms}ms")
                    parent = ["parent", "1:1", "handle", "10:"]
                else:
                    parent = ["root"]
                _run(*x, "tc", "qdisc", "add", "dev", dev, *parent, "tbf",
                     "rate", f"{self.mbit}mbit", "burst", "64kb",
                     "latency", "10ms")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        for ns in (self.src_ns, self.dst_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        return False

    def tx_bytes(self, side="src"):
        """Bytes the veth end in the source (or destination) namespace has
        sent so far: what crossed the capped link, headers included."""
        dev, ns = ((self._veth[0], self.src_ns) if side == "src" else
                   (self._veth[1], self.dst_ns))
        return int(_run("ip", "netns", "exec", ns, "cat",
                        f"/sys/class/net/{dev}/statistics/tx_bytes"))

    def describe(self):
        return (f"veth between netns {self.src_ns} and {self.dst_ns}, "
                f"tbf {self.mbit} Mbit/s" +
                (f", netem {self.delay_ms} ms" if self.delay_ms else ""))
