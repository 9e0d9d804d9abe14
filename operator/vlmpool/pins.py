"""Every version pin of vlmpool, in one place: the releases of the software vlmpool follows, builds or names.

Neutral and plain stdlib: it imports nothing (of vlmpool or otherwise), so every part of vlmpool imports it
without an import cycle, and the hack/ scripts read it before any virtual environment exists::

    python3 operator/vlmpool/pins.py K8S_VERSION     # one pin, its value alone
    python3 operator/vlmpool/pins.py                 # every pin, one KEY=VALUE a line

Moving a pin is an edit of this file only (and of the generated files that name it: ``make crds``
rewrites the CRDs' default engine image). tests/test_single_spelling.py fails when a pin's value is spelled
again in the tree where this module can be read instead.
"""

from __future__ import annotations

import sys

# The vLLM PyPI release the simulator follows, the patcher refuses for, tests/vllm installs (make test-vllm),
# the CPU engine image is built from (images/build.sh, hack/vllm-env.sh) and the pool's default engine image
# runs. Moving it: docs/sim.md, "Moving the pinned vLLM release".
VLLM_RELEASE = "0.32.0"
# Kubernetes: the control plane of the tests and of `vlmpool dev` (hack/k8s-bins.sh builds these binaries),
# the kubelet version the local node reports, the version `helm lint/template` render for.
K8S_VERSION = "1.35.4"
# etcd and helm, found or built by hack/k8s-bins.sh next to the Kubernetes binaries.
ETCD_VERSION = "3.6.16"
HELM_VERSION = "3.19.5"
# The Gateway API Inference Extension release whose EPP and InferencePool CRD hack/epp.sh builds (the last
# tag with cmd/epp) and whose EPP image the routing manifests name.
GIE_VERSION = "1.5.0"
# containerd of the real node (hack/containerd-bins.sh; Debian's 1.6 is end of life).
CONTAINERD_VERSION = "2.2.9"
# The pause (sandbox) image of the real node's containerd, built from that Kubernetes' source (hack/node.sh).
PAUSE_VERSION = "3.10.1"

PINS: dict[str, str] = {
    "VLLM_RELEASE": VLLM_RELEASE,
    "K8S_VERSION": K8S_VERSION,
    "ETCD_VERSION": ETCD_VERSION,
    "HELM_VERSION": HELM_VERSION,
    "GIE_VERSION": GIE_VERSION,
    "CONTAINERD_VERSION": CONTAINERD_VERSION,
    "PAUSE_VERSION": PAUSE_VERSION,
}


def main(argv: list[str]) -> int:
    if not argv:
        for key, value in PINS.items():
            print(f"{key}={value}")
        return 0
    if len(argv) == 1 and argv[0] in PINS:
        print(PINS[argv[0]])
        return 0
    print(f"usage: pins.py [{'|'.join(PINS)}]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
