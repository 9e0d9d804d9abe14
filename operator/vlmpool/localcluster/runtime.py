"""How the process kubelet turns a container spec into a local process.

- The project's own images run their `vlmpool ...` command with this installation's `vlmpool`.
- The vLLM engine image runs the simulator (`vlmpool sim`) with vLLM's flags, which the simulator accepts.
- Any other container with an explicit command runs that command on the host.

Each pod owns one loopback address (127.0.0.N). Inside a pod `localhost` is the pod itself, so the
kubelet rewrites the loopback and wildcard addresses in a container's arguments and environment to
the pod's address (`VLMPOOL_BIND_HOST` tells vlmpool's servers where to listen by default).

Volumes are directories on the host, bind-mounted at their mountPath inside a private mount
namespace (`unshare --mount`), read-only where the pod says so: the process sees the paths its
manifest names, and nothing leaks into the host's mount table.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

# An empty directory on the host; each container mounts its own private tmpfs over it (in its
# mount namespace) to stage volume sources.
STAGE_DIR = "/.vlmpool-stage"

_LOOPBACK = re.compile(r"(?<![\w.])(?:127\.0\.0\.1|localhost|0\.0\.0\.0)(?![\w.])")


class RuntimeRefusal(Exception):
    """The container cannot run here; `reason` becomes the container's waiting reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def vlmpool_executable() -> list[str]:
    exe = Path(sys.executable).with_name("vlmpool")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("vlmpool")
    return [found] if found else [sys.executable, "-m", "vlmpool"]


def is_engine_image(image: str) -> bool:
    repo = image.split("@", 1)[0].rsplit(":", 1)[0] if "/" in image else image.split(":", 1)[0]
    return "vllm" in repo.lower()


def resolve_command(container: dict, pod_ip: str) -> list[str]:
    command = list(container.get("command") or [])
    args = list(container.get("args") or [])
    image = container.get("image", "")
    if command[:1] == ["vlmpool"]:
        return vlmpool_executable() + command[1:] + args
    if not command and is_engine_image(image):
        # vLLM's image entrypoint is its OpenAI server; its flags go to the simulator unchanged.
        args = [a for a in args if a != "serve"]
        return vlmpool_executable() + ["sim", "--host", pod_ip] + args
    if command and command[0] in ("python", "python3") and args[:2] == ["-m", "vlmpool"]:
        return [sys.executable] + args
    if command:
        return command + args
    raise RuntimeRefusal("ImageNotRunnable",
                         f"image {image!r} has no command the process kubelet can run (only vlmpool images, "
                         "the vLLM image (run as the simulator) and containers with an explicit command)")


def rewrite_loopback(value: str, pod_ip: str) -> str:
    return _LOOPBACK.sub(pod_ip, value)


@dataclass
class Mount:
    source: Path
    target: str
    read_only: bool = False
    is_file: bool = False


def host_paths() -> list[Path]:
    """The host directories a container process of the process kubelet runs from: this interpreter's
    installation (the checkout's venv) and the directory vlmpool is imported from (an editable
    checkout). A volume mounted over one of their ancestors (an emptyDir at /tmp for a checkout under
    /tmp) would hide them from the process ("exec: .../.venv/bin/vlmpool: not found")."""
    import vlmpool

    paths = {Path(sys.prefix).resolve(), Path(vlmpool.__file__).resolve().parent.parent}
    return sorted(paths)


@dataclass
class ProcessSpec:
    argv: list[str]
    env: dict[str, str]
    cwd: str | None = None
    mounts: list[Mount] = field(default_factory=list)
    # Host directories the process must still see after its volumes are mounted (host_paths()).
    keep: list[Path] = field(default_factory=host_paths)

    def all_mounts(self) -> list[Mount]:
        """The pod's mounts, then each kept host directory that a mount target covers, bound back
        onto itself read-only (its depth orders it after the volume that covers it)."""
        extra = [Mount(k, str(k), True) for k in self.keep
                 if any(_covers(m.target, k) for m in self.mounts)]
        return self.mounts + extra

    def launcher(self) -> list[str]:
        """argv that sets up the mounts in a private mount namespace, then execs the container.

        Every source is first bind-mounted into a private staging tmpfs, and only then onto its
        target (parents before children): a volume mounted over a directory that holds another
        volume's source (an emptyDir at /tmp, say) cannot hide that source."""
        if not self.mounts and not self.cwd:
            return self.argv
        mounts = self.all_mounts()
        lines = ["set -e"]
        if mounts:
            stage = shlex.quote(STAGE_DIR)
            lines.append(f"mount -t tmpfs -o mode=0700 vlmpool-stage {stage}")
            for i, m in enumerate(mounts):
                lines.append(f"{'touch' if m.is_file else 'mkdir'} {stage}/{i}")
                lines.append(f"mount --bind {shlex.quote(str(m.source))} {stage}/{i}")
            ordered = sorted(enumerate(mounts), key=lambda im: len(Path(im[1].target).parts))
            for i, m in ordered:
                dst = shlex.quote(m.target)
                # The mount point may live inside a volume mounted just before (an emptyDir at /tmp).
                if m.is_file:
                    lines.append(f"[ -e {dst} ] || {{ mkdir -p $(dirname {dst}) && touch {dst}; }}")
                else:
                    lines.append(f"mkdir -p {dst}")
                lines.append(f"mount --bind {stage}/{i} {dst}")
            for _, m in ordered:  # read-only last, so nested mount points could still be made
                if m.read_only:
                    lines.append(f"mount -o remount,bind,ro {shlex.quote(m.target)}")
            lines.append(f"umount -l {stage}")
        if self.cwd:
            lines.append(f"cd {shlex.quote(self.cwd)}")
        lines.append('exec "$@"')
        wrapper = ["sh", "-c", "\n".join(lines), "container"] + self.argv
        if not self.mounts:
            return wrapper
        return ["unshare", "--mount", "--propagation", "private", "--"] + wrapper

    def prepare_mount_points(self) -> None:
        """Mount points must exist before the bind; make them (as empty dirs/files) when missing."""
        if self.mounts:
            Path(STAGE_DIR).mkdir(parents=True, exist_ok=True)
        for m in self.mounts:
            target = Path(m.target)
            if target.exists():
                continue
            try:
                if m.is_file:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.touch()
                else:
                    target.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise RuntimeRefusal("CreateContainerError",
                                     f"cannot create mount point {m.target}: {e}") from e


def _covers(target: str, path: Path) -> bool:
    """Whether a mount at `target` hides `path` (the target is `path` or one of its ancestors)."""
    t = Path(os.path.normpath(target))
    return path == t or t in path.parents


def mounts_supported() -> tuple[bool, str]:
    """Whether this host can give containers private bind mounts (root with CAP_SYS_ADMIN)."""
    if not shutil.which("unshare"):
        return False, "`unshare` (util-linux) is not installed"
    if os.geteuid() != 0:
        return False, "the process kubelet needs root to bind-mount volumes into private mount namespaces"
    return True, ""
