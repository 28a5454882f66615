"""config.json of the trainer's OCI bundle (images/bundle.sh), from `runc spec` and the image's config.

    python3 images/oci_config.py BUNDLE/config.json IMAGE_CONFIG.json

What Slurm's OCI containers (22.05, runc) need to train across nodes, each seen working on the local cluster:

- the host's network, PID and UTS namespaces: torchrun's c10d rendezvous names each agent by host name and
  pid, and two containers that are both pid 1 on host "runc" collide (the rendezvous hangs); the node names
  resolve through the host's /etc/hosts (and resolv.conf), mounted read-only;
- a read-only root (every node and job shares one rootfs folder), with tmpfs /tmp and HOME (caches);
- /dev/shm without runc's 64 MiB cap (DeepSpeed's shared-memory op, data loaders);
- nofile 20000 (runc's default 1024 is too few for gloo across ranks);
- the image's environment, working directory and user (uid 1000). The job's own user, mounts and working
  directory are set per step by images/oci-run (oci.conf's RunTimeRun).

Standard library only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DROP_NAMESPACES = {"pid", "network", "uts"}


def bundle_config(spec: dict, image: dict) -> dict:
    env = list(image.get("Env") or spec["process"]["env"])
    home = next((e.split("=", 1)[1] for e in env if e.startswith("HOME=")), "/tmp")
    user = (image.get("User") or "1000:1000").split(":")
    uid = int(user[0]) if user[0].isdigit() else 1000
    gid = int(user[1]) if len(user) > 1 and user[1].isdigit() else uid
    process = spec["process"]
    process.update({
        "terminal": False,
        "user": {"uid": uid, "gid": gid},
        "args": list(image.get("Cmd") or ["/bin/sh"]),
        "env": env,
        "cwd": image.get("WorkingDir") or "/",
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 20000, "soft": 20000}],
    })
    spec["root"] = {"path": "rootfs", "readonly": True}
    spec.pop("hostname", None)
    mounts = []
    for m in spec["mounts"]:
        if m["destination"] == "/dev/shm":
            m["options"] = [o for o in m.get("options", []) if not o.startswith("size=")]
        mounts.append(m)
    for path in ("/etc/hosts", "/etc/resolv.conf"):
        mounts.append({"destination": path, "type": "bind", "source": path, "options": ["rbind", "ro"]})
    for path in dict.fromkeys(["/tmp", home]):
        mounts.append({"destination": path, "type": "tmpfs", "source": "tmpfs",
                       "options": ["nosuid", "nodev", "mode=1777"]})
    spec["mounts"] = mounts
    linux = spec["linux"]
    linux["namespaces"] = [ns for ns in linux["namespaces"] if ns["type"] not in DROP_NAMESPACES]
    return spec


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__.split("\n\n")[1])
    config, image = Path(sys.argv[1]), Path(sys.argv[2])
    spec = bundle_config(json.loads(config.read_text()), json.loads(image.read_text()))
    config.write_text(json.dumps(spec, indent=2) + "\n")


if __name__ == "__main__":
    main()
