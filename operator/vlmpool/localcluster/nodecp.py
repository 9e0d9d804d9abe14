"""The real node's control plane (hack/node.sh): etcd, kube-apiserver and kube-controller-manager on the
node's own address, kept running until SIGTERM.

    python -m vlmpool.localcluster.nodecp --workdir DIR --address 10.213.0.2 --port 6443

hack/node.sh runs it inside the node's network namespace. It writes, under DIR:
- admin.kubeconfig (system:masters; the kubelet uses it too: the apiserver runs no Node authorizer);
- kube-scheduler.kubeconfig and kube-proxy.kubeconfig (the users Kubernetes' default RBAC binds to those
  components' roles);
- ready, once all of them are written (removed again on stop).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from vlmpool.localcluster.controlplane import ControlPlane


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="vlmpool-nodecp", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--address", required=True, help="the node's address: the apiserver binds and advertises it")
    ap.add_argument("--port", type=int, default=6443)
    ap.add_argument("--bin-dir", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    ready = args.workdir / "ready"
    ready.unlink(missing_ok=True)
    cp = ControlPlane(args.workdir, bin_dir=args.bin_dir, address=args.address, api_port=args.port,
                      # kubectl logs/exec/port-forward: reach the kubelet on the node's InternalIP (the node
                      # name does not resolve here).
                      extra_apiserver_args=["--kubelet-preferred-address-types=InternalIP"])
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    cp.start()
    try:
        for user, component in (("system:kube-scheduler", "kube-scheduler"), ("system:kube-proxy", "kube-proxy")):
            cp.kubeconfig_for(user).replace(args.workdir / f"{component}.kubeconfig")
        ready.write_text(cp.server + "\n")
        stop.wait()
    finally:
        ready.unlink(missing_ok=True)
        cp.stop()


if __name__ == "__main__":
    main()
