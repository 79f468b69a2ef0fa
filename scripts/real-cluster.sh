#!/usr/bin/env bash
# A Kubernetes 1.20.2 cluster whose nodes are real (containerd + kubelet each), all inside a network
# namespace of its own, in the scratch directory DIR:
#
#   scripts/real-cluster.sh up DIR [NODES]      # NODES defaults to 2; prints DIR/env on its last line
#   scripts/real-cluster.sh import DIR ARCHIVE  # imports an OCI archive into every node's containerd
#   scripts/real-cluster.sh restart-node DIR I  # node I goes down hard (kubelet, containerd, every
#                                               # container) and comes back, as after a power cut
#   scripts/real-cluster.sh remove-node DIR I   # node I goes down hard and its Node object is deleted
#   scripts/real-cluster.sh replace-node DIR I NEWNAME [LABELS]
#                                               # node I (removed first if still up) is rebuilt as
#                                               # NEWNAME: same address, disk (/mnt/data) and images,
#                                               # a new kubelet identity, kubelet --node-labels LABELS
#   scripts/real-cluster.sh down DIR            # stops and removes everything `up` made
#
# KUBELET_API_QPS=50 KUBELET_API_BURST=100 set the kubelets' API client limit (default 1.20's 5 / 10).
# DATA_TMPFS_SIZE=4G gives each node's /mnt/data a tmpfs of its own (filesystem-wide figures such as a
# `local` volume's kubelet_volume_stats then move only with what the node's pods write).
#
# Then:  ip netns exec "$NETNS" kubectl --kubeconfig DIR/admin.kubeconfig get nodes   (NETNS from DIR/env)
#
# What runs (facts and traps: /work/shared/notes/real-node.md):
# - in the network namespace: a registry on its 127.0.0.1:5000 holding the nginx stand-in (containerd
#   mirrors docker.io there, so `image: nginx` with pull policy Always works), etcd, kube-apiserver,
#   kube-controller-manager, kube-scheduler and one kube-proxy on API_IP, a /32 on the namespace's lo;
# - per node, in a mount namespace of its own (kubelet 1.20 and the DaemonSet's hostPaths hard-code
#   /var/lib/kubelet, /var/log/pods, /mnt/data, ...; each node bind-mounts its own directories there):
#   containerd and kubelet on the node's /32, a CNI bridge and pod subnet, a cgroup root.
# Nothing is addressed or routed on the host's interfaces: deleting the namespace removes every address,
# bridge, veth and iptables rule. Names come from DIR (namespace, cgroup roots, addresses), so clusters
# in different directories run side by side. Host-wide changes (the sysctls the kubelet sets, empty
# mount-point directories) are shared: the first cluster up saves, the last one down restores.
# Needs root and scripts/setup-real-nodes.sh.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=real-nodes-env.sh
source "$HERE/real-nodes-env.sh"

CMD=${1:?usage: real-cluster.sh up|down|import DIR ...}
mkdir -p "${2:?cluster directory}"
DIR=$(cd "$2" && pwd)

# --- names and addresses, derived from DIR ---------------------------------------------------------
ID=$(printf '%s' "$DIR" | sha256sum | cut -c1-6)
SLOT=$((16#$ID % 250 + 1))
NETNS="hostvol-$ID"
API_IP="10.250.$SLOT.1"
API_PORT=6443
SERVICE_CIDR=10.0.0.0/24   # the `kubernetes` Service is 10.0.0.1
CLUSTER_CIDR=10.244.0.0/16
REGISTRY=127.0.0.1:5000    # the namespace's own loopback
PAUSE_IMAGE=k8s.gcr.io/pause:3.2
ETCD_DIR="/dev/shm/hostvol-real-$ID-etcd"   # etcd fsyncs a lot; RAM keeps two clusters fast on 2 cores
SHARED=/run/hostvol-real-clusters           # host-wide bookkeeping of every cluster of this script
PKI=$DIR/pki PIDS=$DIR/pids LOGS=$DIR/logs
node_name() { echo "node-$1"; }
node_ip() { echo "10.250.$SLOT.$((10 + $1))"; }
node_subnet() { echo "10.244.$1.0/24"; }
node_bridge() { echo "hv$ID-$1"; }
node_cgroup() { echo "hostvol-$ID-$(node_name "$1")"; }
node_dir() { echo "$DIR/nodes/$(node_name "$1")"; }
# The name node I registers as: node-I, or the NEWNAME of a replace-node.
node_identity() { cat "$(node_dir "$1")/identity" 2>/dev/null || node_name "$1"; }
CGROUP_HIERARCHIES="cpu cpuacct cpuset memory devices freezer blkio pids systemd"
# Paths kubelet 1.20, CNI and the DaemonSet use on "the node"; each node bind-mounts its own over them.
NODE_MOUNTS="/var/lib/kubelet /var/lib/cni /var/log/pods /var/log/containers /mnt/data /run/hostvol"
SYSCTLS="vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys
         kernel.keys.root_maxbytes"

log() { echo "real-cluster[$NETNS]: $*" >&2; }
die() { log "$*"; exit 1; }
# Daemons enter only the network namespace: `ip netns exec` would also remount /sys, hiding
# /sys/fs/cgroup from containerd and the kubelet.
NSX=(nsenter --net="/run/netns/$NETNS" --)
in_ns() { "${NSX[@]}" "$@"; }
kc() { in_ns kubectl --kubeconfig "$DIR/admin.kubeconfig" "$@"; }

# --- processes: each one started here has a pid file; stopping signals exactly that PID -------------
start() { # NAME CMD...   (own session, output to logs/NAME.log)
  local name=$1; shift
  setsid "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$PIDS/$name.pid"
}
# Not a zombie: our daemons outlive this script, and whoever adopts them may reap them late.
running() { [[ -r /proc/$1/stat ]] && [[ $(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) != Z* ]]; }
alive() { [[ -f $PIDS/$1.pid ]] && running "$(cat "$PIDS/$1.pid")"; }
stop() { # NAME [SECONDS before SIGKILL]
  local f=$PIDS/$1.pid pid i
  [[ -f $f ]] || return 0
  pid=$(cat "$f")
  if kill -TERM "$pid" 2>/dev/null; then
    for ((i = 0; i < ${2:-10} * 10; i++)); do running "$pid" || break; sleep 0.1; done
    # (the apiserver can ignore SIGTERM for 20 s and more while kubelets hold watches)
    kill -KILL "$pid" 2>/dev/null && sleep 0.2
  fi
  rm -f "$f"
}
wait_until() { # WHAT SECONDS CMD...
  local what=$1 limit=$2 t0=$SECONDS; shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS - t0 < limit)) || die "timed out after ${limit}s waiting for $what (logs: $LOGS)"
    sleep 0.2
  done
}

# --- up ------------------------------------------------------------------------------------------
check_parts() {
  local missing=()
  for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy; do
    [[ -x $K8S_BIN/$b ]] || missing+=("$K8S_BIN/$b")
  done
  for c in etcd containerd runc ctr skopeo docker-registry iptables conntrack nsenter unshare openssl curl kubectl; do
    command -v "$c" >/dev/null || missing+=("$c")
  done
  [[ -x /usr/lib/cni/bridge ]] || missing+=(/usr/lib/cni/bridge)
  IMAGES_DIR=$(images_dir)
  for i in "${NODE_IMAGES[@]}"; do [[ -f $IMAGES_DIR/$i.oci.tar ]] || missing+=("$IMAGES_DIR/$i.oci.tar"); done
  ((${#missing[@]} == 0)) || die "missing: ${missing[*]}. Run $SETUP_REAL_NODES"
}

host_setup() {
  mkdir -p "$SHARED/up"
  exec 8>"$SHARED/lock"
  flock 8
  # Markers of clusters whose namespace is gone (killed without `down`) do not hold the host state.
  for m in "$SHARED"/up/*; do [[ -e $m && ! -e /run/netns/${m##*/} ]] && rm -f "$m"; done
  if [[ -z $(ls -A "$SHARED/up") ]]; then
    # (a file left by a cluster that never came down holds the host's values; now they are the kubelet's)
    [[ -f $SHARED/sysctl.orig ]] ||
      for s in $SYSCTLS; do echo "$s=$(sysctl -n "$s")"; done >"$SHARED/sysctl.orig"
    # `ip netns add` bind-mounts /run/netns over itself the first time: undone by the last one down
    mountpoint -q /run/netns || touch "$SHARED/netns-mount"
  fi
  # The namespace before the marker, both under the lock: a marker without its namespace is stale.
  ip netns add "$NETNS"
  touch "$SHARED/up/$NETNS"
  for m in $NODE_MOUNTS; do
    [[ -d $m ]] || { mkdir -p "$m" && echo "$m" >>"$SHARED/created-dirs"; }
  done
  flock -u 8
}

sign() { # NAME SUBJECT EXTENDED_KEY_USAGE [SUBJECT_ALT_NAMES]
  openssl req -newkey rsa:2048 -nodes -keyout "$PKI/$1.key" -out "$PKI/$1.csr" -subj "$2" 2>/dev/null
  printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=%s\n%s' \
    "$3" "${4:+subjectAltName=$4}" >"$PKI/$1.ext"
  openssl x509 -req -in "$PKI/$1.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial -days 30 \
    -extfile "$PKI/$1.ext" -out "$PKI/$1.crt" 2>/dev/null
  rm -f "$PKI/$1.csr" "$PKI/$1.ext"
}

make_pki() {
  local i
  mkdir -p "$PKI"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$PKI/ca.key" -out "$PKI/ca.crt" -days 30 \
    -subj "/CN=hostvol-real-$ID" 2>/dev/null
  # 10.0.0.1: pods reach the apiserver through the `kubernetes` Service
  sign apiserver /CN=kube-apiserver serverAuth \
    "IP:$API_IP,IP:10.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  # exec, logs and port-forward: the apiserver as a client of the kubelets
  sign kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
  for ((i = 1; i <= NODES; i++)); do
    sign "kubelet-$(node_name $i)" "/CN=$(node_name $i)" serverAuth "IP:$(node_ip $i),DNS:$(node_name $i)"
  done
  openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
  openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  token() { head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
  {
    echo "$(token),admin,admin,system:masters"
    echo "$(token),system:kube-proxy,system:kube-proxy"
    # NodeRestriction and the Node authorizer know a kubelet by this user and group
    for ((i = 1; i <= NODES; i++)); do
      echo "$(token),system:node:$(node_name $i),system:node:$(node_name $i),system:nodes"
    done
  } >"$PKI/tokens.csv"
  kubeconfig() { # FILE USER
    cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: $NETNS
  cluster: {server: "https://$API_IP:$API_PORT", certificate-authority: $PKI/ca.crt}
users:
- name: $2
  user: {token: $(awk -F, -v u="$2" '$2 == u {print $1}' "$PKI/tokens.csv")}
contexts:
- name: $NETNS
  context: {cluster: $NETNS, user: $2}
current-context: $NETNS
EOF
  }
  kubeconfig "$DIR/admin.kubeconfig" admin
  kubeconfig "$DIR/kube-proxy.kubeconfig" system:kube-proxy
  for ((i = 1; i <= NODES; i++)); do
    kubeconfig "$(node_dir $i)/kubeconfig" "system:node:$(node_name $i)"
  done
}

start_registry() {
  mkdir -p "$DIR/registry/data"
  cat >"$DIR/registry/config.yml" <<EOF
version: 0.1
log: {level: warn}
storage: {filesystem: {rootdirectory: $DIR/registry/data}}
http: {addr: $REGISTRY}
EOF
  start registry "${NSX[@]}" docker-registry serve "$DIR/registry/config.yml"
  wait_until registry 20 in_ns curl -sf "http://$REGISTRY/v2/"
  # docker.io/library/nginx:TAG is what `image: nginx` means; the mirror serves it as library/nginx:TAG
  for a in "$IMAGES_DIR"/nginx-*.oci.tar; do
    local tag=${a##*/nginx-}; tag=${tag%.oci.tar}
    in_ns skopeo copy --quiet --dest-tls-verify=false "oci-archive:$a" "docker://$REGISTRY/library/nginx:$tag"
  done
}

start_control_plane() {
  rm -rf "$ETCD_DIR"
  start etcd "${NSX[@]}" etcd --name "$NETNS" --data-dir "$ETCD_DIR" \
    --listen-client-urls "http://$API_IP:2379" --advertise-client-urls "http://$API_IP:2379" \
    --listen-peer-urls "http://$API_IP:2380" --initial-advertise-peer-urls "http://$API_IP:2380" \
    --initial-cluster "$NETNS=http://$API_IP:2380"
  wait_until etcd 30 in_ns curl -sf "http://$API_IP:2379/health"
  start kube-apiserver "${NSX[@]}" "$K8S_BIN/kube-apiserver" --etcd-servers "http://$API_IP:2379" \
    --bind-address "$API_IP" --advertise-address "$API_IP" --secure-port "$API_PORT" \
    --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" --client-ca-file "$PKI/ca.crt" \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
    --service-cluster-ip-range "$SERVICE_CIDR" --token-auth-file "$PKI/tokens.csv" \
    --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction --allow-privileged=true \
    --kubelet-client-certificate "$PKI/kubelet-client.crt" --kubelet-client-key "$PKI/kubelet-client.key" \
    --kubelet-certificate-authority "$PKI/ca.crt" --kubelet-preferred-address-types InternalIP \
    --feature-gates=CSIStorageCapacity=true --runtime-config=storage.k8s.io/v1alpha1=true
  wait_until kube-apiserver 90 in_ns curl -sf --cacert "$PKI/ca.crt" "https://$API_IP:$API_PORT/readyz"
  # node IPAM off (CNI host-local hands out addresses); node lifecycle on: it lifts the not-ready taint
  start kube-controller-manager "${NSX[@]}" "$K8S_BIN/kube-controller-manager" --kubeconfig "$DIR/admin.kubeconfig" \
    --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
    --controllers '*,-nodeipam' --leader-elect=false --secure-port 0 --port 0
  start kube-scheduler "${NSX[@]}" "$K8S_BIN/kube-scheduler" --kubeconfig "$DIR/admin.kubeconfig" \
    --leader-elect=false --secure-port 0 --port 0 --feature-gates=CSIStorageCapacity=true
}

start_kube_proxy() {
  # One for all nodes: they share the network namespace, hence its iptables.
  cat >"$DIR/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $DIR/kube-proxy.kubeconfig}
hostnameOverride: $(node_name 1)
bindAddress: $API_IP
healthzBindAddress: $API_IP:10256
metricsBindAddress: $API_IP:10249
mode: iptables
clusterCIDR: $CLUSTER_CIDR
# zeros: leave the host's conntrack table settings alone
conntrack: {maxPerCore: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
  start kube-proxy "${NSX[@]}" "$K8S_BIN/kube-proxy" --config "$DIR/kube-proxy.yaml"
  wait_until kube-proxy 30 in_ns curl -sf "http://$API_IP:10256/healthz"
}

node_configs() { # I
  local n; n=$(node_dir "$1")
  mkdir -p "$n"/{containerd,runc,cni/net.d,cni/ipam,certs.d/docker.io,volume-plugins} \
    "$n"/mounts/{kubelet,cni,pods,containers,data,run-hostvol}
  # On the host, so the node's mount namespace (copied at unshare) has it; `down` unmounts it.
  if [[ -n ${DATA_TMPFS_SIZE:-} ]] && ! mountpoint -q "$n/mounts/data"; then
    mount -t tmpfs -o "size=$DATA_TMPFS_SIZE,mode=0755" "hostvol-data-$(node_name "$1")" "$n/mounts/data"
  fi
  cat >"$n/containerd.toml" <<EOF
version = 2
root = "$n/containerd/root"
state = "$n/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "$n/containerd.sock"
[ttrpc]
  address = ""
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$n/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # CAP_SYS_RESOURCE is not in these machines' bounding set: runc cannot lower oom_score_adj, and every
  # sandbox would fail with "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  # pod network namespaces are mounted under the state dir, not the host's /run/netns
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$n/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$n/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$n/certs.d"
EOF
  cat >"$n/certs.d/docker.io/hosts.toml" <<EOF
server = "https://registry-1.docker.io"
[host."http://$REGISTRY"]
  capabilities = ["pull", "resolve"]
EOF
  cat >"$n/cni/net.d/10-pods.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "pods",
  "plugins": [
    {"type": "bridge", "bridge": "$(node_bridge "$1")", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "dataDir": "$n/cni/ipam", "ranges": [[{"subnet": "$(node_subnet "$1")"}]],
              "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  cat >"$n/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $(node_ip "$1")
healthzBindAddress: $(node_ip "$1")
readOnlyPort: 0
tlsCertFile: $PKI/kubelet-$(node_identity "$1").crt
tlsPrivateKeyFile: $PKI/kubelet-$(node_identity "$1").key
authentication: {anonymous: {enabled: false}, webhook: {enabled: true}, x509: {clientCAFile: $PKI/ca.crt}}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
cgroupRoot: /$(node_cgroup "$1")
failSwapOn: false
resolvConf: ""
volumePluginDir: $n/volume-plugins
# the kubelet cannot give itself -999 without CAP_SYS_RESOURCE
oomScoreAdj: 0
# the host's disk use must neither evict pods nor garbage-collect the imported images
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", nodefs.inodesFree: "1%", imagefs.available: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# Ready is reported at the first status update after registration: 2 s instead of 10
nodeStatusUpdateFrequency: 2s
# The kubelet's own API client limit: 1.20's defaults unless KUBELET_API_QPS / KUBELET_API_BURST say
# otherwise (1.27 raised them to 50 / 100; benches/statefulset_bursts compares)
kubeAPIQPS: ${KUBELET_API_QPS:-5}
kubeAPIBurst: ${KUBELET_API_BURST:-10}
EOF
}

node_cgroups() { # I    the kubelet refuses a cgroup root missing from any hierarchy
  local cg; cg=$(node_cgroup "$1")
  for h in $CGROUP_HIERARCHIES; do
    mkdir -p "/sys/fs/cgroup/$h/$cg"
    if [[ $h == cpuset ]]; then # an empty cpuset takes no tasks
      cat /sys/fs/cgroup/cpuset/cpuset.cpus >"/sys/fs/cgroup/cpuset/$cg/cpuset.cpus"
      cat /sys/fs/cgroup/cpuset/cpuset.mems >"/sys/fs/cgroup/cpuset/$cg/cpuset.mems"
    fi
  done
}

start_node() { # I
  node_configs "$1"
  node_cgroups "$1"
  rm -rf "$(node_dir "$1")/cni/ipam"   # host-local keeps addresses of sandboxes killed without CNI DEL
  start "$(node_name "$1")" "${NSX[@]}" unshare --mount --propagation private -- \
    "$HERE/real-cluster.sh" _node "$DIR" "$1" "$NODES"
}

# Runs in the node's own mount namespace (and the cluster's network namespace); becomes the kubelet.
node_inner() { # I
  local n; n=$(node_dir "$1")
  # CRI refuses HostToContainer/Bidirectional propagation from a private mount; the host's / is private.
  mount --make-rshared /
  mount --bind "$n/mounts/kubelet" /var/lib/kubelet
  mount --bind "$n/mounts/cni" /var/lib/cni
  mount --bind "$n/mounts/pods" /var/log/pods
  mount --bind "$n/mounts/containers" /var/log/containers
  mount --bind "$n/mounts/data" /mnt/data
  mount --bind "$n/mounts/run-hostvol" /run/hostvol
  start "$(node_name "$1")-containerd" containerd --config "$n/containerd.toml"
  wait_until "$(node_name "$1") containerd" 30 ctr -a "$n/containerd.sock" version
  for a in "$IMAGES_DIR"/*.oci.tar; do
    ctr -a "$n/containerd.sock" -n k8s.io images import "$a" >/dev/null
  done
  local labels=()   # a rebuilt node's (replace-node)
  [[ -s $n/labels ]] && labels=(--node-labels "$(cat "$n/labels")")
  exec "$K8S_BIN/kubelet" --config "$n/kubelet.yaml" --kubeconfig "$n/kubeconfig" \
    --hostname-override "$(node_identity "$1")" --node-ip "$(node_ip "$1")" --root-dir /var/lib/kubelet \
    --container-runtime remote --container-runtime-endpoint "unix://$n/containerd.sock" \
    --pod-infra-container-image "$PAUSE_IMAGE" "${labels[@]}" --v 2
}

node_ready() { # I
  [[ $(kc get node "$(node_identity "$1")" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}{.spec.taints}') == True ]]
}

default_sa_ready() { [[ -n $(kc get sa default -o jsonpath='{.secrets}') ]]; }

up() {
  local i
  [[ $(id -u) == 0 ]] || die "needs root"
  check_parts
  [[ ! -e /run/netns/$NETNS ]] || die "$NETNS exists: a cluster in $DIR is up (real-cluster.sh down $DIR)"
  local t0=$SECONDS
  trap '(($? == 0)) || log "up failed (logs in $LOGS); \`$0 down $DIR\` removes what was started"' EXIT
  mkdir -p "$PIDS" "$LOGS"
  echo "$NODES" >"$DIR/nodes-count"
  host_setup
  ip -n "$NETNS" link set lo up
  ip -n "$NETNS" addr add "$API_IP/32" dev lo
  for ((i = 1; i <= NODES; i++)); do ip -n "$NETNS" addr add "$(node_ip $i)/32" dev lo; done
  for ((i = 1; i <= NODES; i++)); do mkdir -p "$(node_dir $i)"; done
  make_pki
  start_registry
  start_control_plane
  start_kube_proxy
  log "control plane up after $((SECONDS - t0)) s"
  local tn=$SECONDS
  for ((i = 1; i <= NODES; i++)); do start_node $i; done
  for ((i = 1; i <= NODES; i++)); do
    wait_until "$(node_name $i) Ready" 120 node_ready $i
    alive "$(node_name $i)" || die "$(node_name $i) exited (logs: $LOGS/$(node_name $i)*.log)"
  done
  log "$NODES nodes Ready after $((SECONDS - tn)) s"
  # pods need their namespace's ServiceAccount token (the controller-manager makes it)
  wait_until "default ServiceAccount" 60 default_sa_ready
  {
    echo "CLUSTER_DIR=$DIR"
    echo "NETNS=$NETNS"
    echo "API_SERVER=https://$API_IP:$API_PORT"
    echo "KUBECONFIG=$DIR/admin.kubeconfig"
    echo "NODES=$(for ((i = 1; i <= NODES; i++)); do printf '%s ' "$(node_name $i)"; done | sed 's/ $//')"
    for ((i = 1; i <= NODES; i++)); do
      # each node's /mnt/data, as the host sees it
      echo "NODE_$i=$(node_name $i) $(node_ip $i) $(node_dir $i)/mounts/data $(node_dir $i)/containerd.sock"
    done
    echo "UP_SECONDS=$((SECONDS - t0))"
  } >"$DIR/env"
  log "up after $((SECONDS - t0)) s; kubectl: ip netns exec $NETNS kubectl --kubeconfig $DIR/admin.kubeconfig"
  echo "$DIR/env"
}

import() { # ARCHIVE
  local i
  local a=${1:?OCI archive}
  for ((i = 1; i <= NODES; i++)); do
    ctr -a "$(node_dir $i)/containerd.sock" -n k8s.io images import "$a" >/dev/null
  done
}

# --- down ----------------------------------------------------------------------------------------
stop_node() { # I
  local n sock cg try
  n=$(node_dir "$1"); sock=$n/containerd.sock; cg=$(node_cgroup "$1")
  stop "$(node_name "$1")" 20   # the kubelet
  if [[ -S $sock ]] && alive "$(node_name "$1")-containerd"; then
    for t in $(ctr -a "$sock" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr -a "$sock" -n k8s.io tasks kill -s KILL "$t" >/dev/null 2>&1 || true
    done
  fi
  stop "$(node_name "$1")-containerd"
  # Shims outlive containerd; this node's name its socket (a path under DIR) on their command line.
  for p in $(pgrep -f -- "-address $sock( |$)" || true); do kill -KILL "$p" 2>/dev/null || true; done
  # Whatever is left in the node's cgroups is a container of this node.
  for p in $(cat /sys/fs/cgroup/pids/"$cg"/cgroup.procs $(find "/sys/fs/cgroup/pids/$cg" -mindepth 2 \
      -name cgroup.procs 2>/dev/null) 2>/dev/null); do
    kill -KILL "$p" 2>/dev/null || true
  done
  for h in $CGROUP_HIERARCHIES; do
    [[ -d /sys/fs/cgroup/$h/$cg ]] || continue
    for ((try = 0; try < 20; try++)); do
      find "/sys/fs/cgroup/$h/$cg" -depth -type d -exec rmdir {} + 2>/dev/null
      [[ -d /sys/fs/cgroup/$h/$cg ]] || break
      sleep 0.1
    done
  done
}

host_teardown() {
  [[ -d $SHARED ]] || return 0
  exec 8>"$SHARED/lock"
  flock 8
  rm -f "$SHARED/up/$NETNS"
  for m in "$SHARED"/up/*; do [[ -e $m && ! -e /run/netns/${m##*/} ]] && rm -f "$m"; done
  if [[ -n $(ls -A "$SHARED/up") ]]; then
    log "other clusters up ($(ls "$SHARED/up" | tr '\n' ' ')): the host's sysctls and mount points stay for the last one"
    return 0
  fi
  if [[ -f $SHARED/netns-mount && -z $(ls -A /run/netns 2>/dev/null) ]]; then
    umount /run/netns && rm -f "$SHARED/netns-mount"
  fi
  if [[ -f $SHARED/sysctl.orig ]]; then
    while IFS== read -r k v; do [[ $(sysctl -n "$k") == "$v" ]] || sysctl -qw "$k=$v"; done <"$SHARED/sysctl.orig"
    rm -f "$SHARED/sysctl.orig"
  fi
  # Removing a directory that is a mount point in another mount namespace silently unmounts it there:
  # keep any that some process (another cluster's node, whatever its script) still mounts over.
  if [[ -f $SHARED/created-dirs ]]; then
    sort -ru "$SHARED/created-dirs" | while read -r d; do
      if grep -qs " $d " /proc/[0-9]*/mountinfo; then log "kept $d: still a mount point somewhere"; echo "$d"
      else rmdir "$d" 2>/dev/null || { log "kept $d: not empty"; echo "$d"; }; fi
    done >"$SHARED/created-dirs.kept"
    mv "$SHARED/created-dirs.kept" "$SHARED/created-dirs"
    [[ -s $SHARED/created-dirs ]] || rm -f "$SHARED/created-dirs"
  fi
}

down() {
  set +e   # take down whatever is there
  local i
  local t0=$SECONDS
  for ((i = 1; i <= NODES; i++)); do stop_node $i; done
  stop kube-proxy
  stop kube-scheduler
  stop kube-controller-manager
  stop kube-apiserver 15
  stop etcd
  stop registry
  if [[ -e /run/netns/$NETNS ]]; then
    # Only this script's processes know the namespace: whatever is left in it is ours.
    for p in $(ip netns pids "$NETNS" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
    sleep 0.2
    ip netns del "$NETNS"
  fi
  rm -rf "$ETCD_DIR"
  # Mounts live in the nodes' mount namespaces, gone with their last process; none should be on the host.
  grep -F " $DIR/" /proc/self/mountinfo | awk '{print $5}' | sort -r | while read -r m; do
    log "unmounting leftover $m"; umount -l "$m" || true
  done
  host_teardown
  rmdir "$PIDS" 2>/dev/null || log "pid files left in $PIDS"
  log "down after $((SECONDS - t0)) s"
}

# --- lost and rebuilt nodes ----------------------------------------------------------------------
remove_node() { # I    the node goes down hard and its Node object is deleted, as when a node is lost
  local name; name=$(node_identity "$1")
  stop_node "$1"
  kc delete node "$name" --ignore-not-found --wait=true >/dev/null
  touch "$(node_dir "$1")/removed"
  log "$name removed (kubelet stopped, Node deleted)"
}

replace_node() { # I NEWNAME LABELS    the node rebuilt under another name with the same disk
  local n; n=$(node_dir "$1")
  [[ -f $n/removed ]] || remove_node "$1"
  # A new identity: the apiserver takes any client certificate of the cluster CA (--client-ca-file),
  # and NodeRestriction lets system:node:NEWNAME register and label node NEWNAME.
  sign "kubelet-$2" "/CN=$2" serverAuth "IP:$(node_ip "$1"),DNS:$2"
  sign "node-$2-client" "/O=system:nodes/CN=system:node:$2" clientAuth
  cat >"$n/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: $NETNS
  cluster: {server: "https://$API_IP:$API_PORT", certificate-authority: $PKI/ca.crt}
users:
- name: system:node:$2
  user: {client-certificate: $PKI/node-$2-client.crt, client-key: $PKI/node-$2-client.key}
contexts:
- name: $NETNS
  context: {cluster: $NETNS, user: system:node:$2}
current-context: $NETNS
EOF
  echo "$2" >"$n/identity"
  echo "$3" >"$n/labels"
  rm -f "$n/removed"
  start_node "$1"
  wait_until "$2 Ready" 120 node_ready "$1"
  sed -i "s|^NODE_$1=[^ ]* |NODE_$1=$2 |" "$DIR/env"
  log "node $1 rebuilt as $2 (labels: ${3:-none})"
}

case $CMD in
up)
  NODES=${3:-2}
  ((NODES >= 1 && NODES <= 9)) || die "1 to 9 nodes"
  up
  ;;
down)
  NODES=$(cat "$DIR/nodes-count" 2>/dev/null || echo 0)
  down
  ;;
import)
  NODES=$(cat "$DIR/nodes-count")
  import "${3:?OCI archive}"
  ;;
restart-node)
  NODES=$(cat "$DIR/nodes-count")
  I=${3:?node number}
  stop_node "$I"
  start_node "$I"
  wait_until "$(node_name "$I") back" 120 alive "$(node_name "$I")"
  log "$(node_name "$I") restarted"
  ;;
remove-node)
  NODES=$(cat "$DIR/nodes-count")
  remove_node "${3:?node number}"
  ;;
replace-node)
  NODES=$(cat "$DIR/nodes-count")
  replace_node "${3:?node number}" "${4:?new node name}" "${5:-}"
  ;;
_node) # internal: the node's process, started by `up` in a new mount namespace
  NODES=$4
  IMAGES_DIR=$(images_dir)
  mkdir -p "$PIDS" "$LOGS"
  node_inner "$3"
  ;;
*) die "usage: real-cluster.sh up|down|import|restart-node|remove-node|replace-node DIR ..." ;;
esac
