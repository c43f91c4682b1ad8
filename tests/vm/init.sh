#!/bin/busybox sh
# PID 1 of the old-kernel VM (tests/tests/old_kernel.rs): runs the real `tollgate` agent on
# Debian's stock 6.1 kernel (no TCX) and prints what the host test decides on, between
# TOLLGATE-VM-* marker lines on the serial console. qemu exits 0 whatever happens here, so
# the last line is always `TOLLGATE-VM-RESULT ok` or `TOLLGATE-VM-RESULT fail: REASON`.
#
# Layout: the guest's initial namespace is the node (169.254.1.1/32 on lo, forwarding on);
# three pods are named network namespaces with a veth pair each and static neighbours both
# ways, so no ARP runs and packet counts are exact:
#   web       10.1.0.10  attached by its /32 route: clsact on hweb; shop namespace, drop mode
#   client    10.1.0.11  attached on its own cgroup (cgroup_skb), checked against its UID; log mode
#   intruder  10.1.0.12  no pod of the cluster
# The policies (cluster.yaml) let only the client into web and the client out only to web;
# the node's own traffic passes whatever they say.

/bin/busybox --install -s /bin
export PATH=/bin:/usr/sbin:/usr/bin
# busybox runs its own ip/tc applets before $PATH: the real iproute2 by absolute path.
IP=/usr/sbin/ip
TC=/usr/sbin/tc
BPFTOOL=/usr/sbin/bpftool
TG=/usr/bin/tollgate
BPFFS=/sys/fs/bpf/tollgate
# The kubelet's directory (systemd driver) for the BestEffort pod client-0.
CGROUP=/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod7467c11e_0000_4000_8000_000000000001.slice
AGENT_LOG=/tmp/tg/agent.log
FLOW_LOG=/tmp/tg/flows.log

section() { # NAME COMMAND...: the command's output between markers
    local section=$1 rc
    shift
    echo "TOLLGATE-VM-BEGIN $section"
    "$@" 2>&1
    rc=$?
    echo "TOLLGATE-VM-END $section"
    return $rc
}

finish() {
    echo "TOLLGATE-VM-RESULT $*"
    sync
    poweroff -f
    sleep 10
}

fail() {
    [ -f $AGENT_LOG ] && section agent-log cat $AGENT_LOG
    finish "fail: $*"
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Whatever the initramfs had at /dev/console: the serial console from here on.
exec </dev/console >/dev/console 2>&1
mkdir -p /run /tmp
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t bpf bpf /sys/fs/bpf || fail "mount bpffs"
mount -t cgroup2 cgroup2 /sys/fs/cgroup || fail "mount cgroup2"
echo "TOLLGATE-VM-KERNEL $(uname -r) up $(cut -d" " -f1 /proc/uptime) s"

# Written by the host in dependency order (veth, sch_ingress for clsact, cls_bpf, act_bpf).
for m in $(cat /lib/modules/load-order); do
    insmod /lib/modules/$m || fail "insmod $m"
done

section selftest $TG selftest --bpffs /sys/fs/bpf/tollgate-selftest || fail "tollgate selftest"

# The network. IPv6 off everywhere: no router solicitations or MLD in the counts.
sysctl -qw net.ipv6.conf.all.disable_ipv6=1
sysctl -qw net.ipv6.conf.default.disable_ipv6=1
sysctl -qw net.ipv4.ip_forward=1
$IP link set lo up || fail "lo up"
$IP addr add 169.254.1.1/32 dev lo || fail "node address"
pod() { # NAME ADDRESS INDEX
    name=$1 addr=$2 pod_mac=02:74:67:00:00:0$3 host_mac=02:74:67:ff:00:0$3
    $IP netns add $name || return 1
    nsenter --net=/run/netns/$name sysctl -qw net.ipv6.conf.all.disable_ipv6=1
    nsenter --net=/run/netns/$name sysctl -qw net.ipv6.conf.default.disable_ipv6=1
    $IP link add h$name address $host_mac type veth peer name eth0 address $pod_mac netns $name &&
        $IP link set h$name up &&
        $IP -n $name link set lo up &&
        $IP -n $name link set eth0 up &&
        $IP -n $name addr add $addr/32 dev eth0 &&
        $IP -n $name route add 169.254.1.1 dev eth0 scope link &&
        $IP -n $name route add default via 169.254.1.1 dev eth0 &&
        $IP -n $name neigh add 169.254.1.1 lladdr $host_mac dev eth0 nud permanent &&
        $IP route add $addr/32 dev h$name &&
        $IP neigh add $addr lladdr $pod_mac dev h$name nud permanent
}
pod web 10.1.0.10 1 || fail "pod web"
pod client 10.1.0.11 2 || fail "pod client"
pod intruder 10.1.0.12 3 || fail "pod intruder"
mkdir -p $CGROUP || fail "cgroup $CGROUP"

mkdir -p /tmp/tg
$TG run --cluster-state /etc/tollgate --bpffs $BPFFS --state-dir /tmp/tg --cgroup-root /sys/fs/cgroup \
    --admin-socket /tmp/tg/admin.sock --metrics-addr 127.0.0.1:9402 --node-name vm-node \
    --detach-on-exit --poll-interval-ms 200 --flow-log $FLOW_LOG >$AGENT_LOG 2>&1 &
AGENT=$!

status() { $TG status -o json --admin-socket /tmp/tg/admin.sock; }

# Ready (programs attached, policy synced), then both workloads attached as expected.
i=0
until wget -q -O /dev/null http://127.0.0.1:9402/readyz 2>/dev/null; do
    kill -0 $AGENT 2>/dev/null || fail "agent exited before it was ready"
    i=$((i + 1))
    [ $i -lt 600 ] || fail "agent not ready after 60 s"
    sleep 0.1
done
i=0
until status >/tmp/status.json 2>&1 && grep -q '"attach": "clsact"' /tmp/status.json &&
    grep -q '"attach": "cgroup"' /tmp/status.json; do
    i=$((i + 1))
    [ $i -lt 300 ] || { cat /tmp/status.json; fail "workloads not attached after 30 s"; }
    sleep 0.1
done

in_pod() { # NAME COMMAND...: in the pod's network namespace (nsenter keeps /sys as it is)
    local pod=$1
    shift
    nsenter --net=/run/netns/$pod "$@"
}
# client -> web, allowed both ways: 3 echo requests and 3 replies, from inside the cgroup.
section ping-client-web in_pod client sh -c \
    "echo \$\$ >$CGROUP/cgroup.procs && exec ping -c 3 -i 0.2 10.1.0.10" ||
    fail "client could not ping web"
# node -> web, a kubelet-style probe from the node's address: passes web's drop-mode
# policy, as Kubernetes requires; 4 requests and 4 replies.
section ping-node-web ping -c 4 -i 0.2 -W 1 -I 169.254.1.1 10.1.0.10 ||
    fail "the node's probe did not reach web in drop mode"
# intruder -> web, denied at web's ingress in drop mode: 4 requests dropped, no replies.
section ping-intruder-web in_pod intruder ping -c 4 -i 0.2 -W 1 10.1.0.10 &&
    fail "the intruder reached web through its policy"
# client -> node: the node's own traffic, allowed although the client is egress-isolated.
section ping-client-node in_pod client sh -c \
    "echo \$\$ >$CGROUP/cgroup.procs && exec ping -c 2 -i 0.2 169.254.1.1" ||
    fail "client could not ping the node"
# client -> intruder, denied at the client's egress in log mode: 2 would-drops each way.
section ping-client-intruder in_pod client sh -c \
    "echo \$\$ >$CGROUP/cgroup.procs && exec ping -c 2 -i 0.2 10.1.0.12" ||
    fail "client could not ping the intruder in log mode"

# The counters are read from the kernel at each request: two equal reads in a row are final.
status >/tmp/status.json || fail "tollgate status"
i=0
# (seconds_since_would_drop ticks on its own.)
counters() { grep -v seconds_since_would_drop "$1"; }
while sleep 0.2 && status >/tmp/status2.json &&
    [ "$(counters /tmp/status.json)" != "$(counters /tmp/status2.json)" ]; do
    mv /tmp/status2.json /tmp/status.json
    i=$((i + 1))
    [ $i -lt 50 ] || fail "counters did not settle"
done
section status cat /tmp/status.json

section flow-log cat $FLOW_LOG
# What is attached now, seen by the kernel's own tools: the same checks below find nothing.
section attached sh -c "$BPFTOOL prog show; $TC filter show dev hweb ingress; \
    $TC filter show dev hweb egress; $BPFTOOL cgroup show $CGROUP"

# A stop that hangs is a failure too, not a timeout of the whole VM.
kill -TERM $AGENT
(sleep 30 && kill -KILL $AGENT) 2>/dev/null &
WATCHDOG=$!
wait $AGENT
rc=$?
kill $WATCHDOG 2>/dev/null
section agent-log cat $AGENT_LOG
[ $rc -eq 0 ] || finish "fail: agent exited with $rc after SIGTERM"

# --detach-on-exit: nothing of tollgate may be left in this kernel.
section leftovers sh -c "$BPFTOOL prog show; $TC filter show dev hweb ingress; \
    $TC filter show dev hweb egress; $BPFTOOL cgroup show $CGROUP; ls -R /sys/fs/bpf"
left=$($BPFTOOL prog show | grep -E 'tc_from_pod|tc_to_pod|cg_ingress|cg_egress|tc_baseline')
[ -z "$left" ] || finish "fail: programs left after --detach-on-exit: $left"
for dir in ingress egress; do
    left=$($TC filter show dev hweb $dir)
    [ -z "$left" ] || finish "fail: tc $dir filters left on hweb: $left"
done
left=$($BPFTOOL cgroup show $CGROUP)
[ -z "$left" ] || finish "fail: programs left on $CGROUP: $left"
[ ! -e $BPFFS ] || finish "fail: $BPFFS left: $(ls -R $BPFFS)"
finish ok
