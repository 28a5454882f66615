"""The host's pip configuration as one file for an image build, and the local paths it needs.

    python3 images/host_pip.py OUT_DIR [--pip "pip3"] [--no-local]

Reads the configuration pip would use here (`pip config list`: /etc/pip.conf, /etc/xdg/pip/pip.conf, the
user's and the site's files, and PIP_* variables, which win), and writes:

- OUT_DIR/pip.conf   one [global]/[install]/... file (given to the build as a secret, never in a layer);
- OUT_DIR/mounts     the local files and folders it names (find-links, file:// indexes, constraint and
                     requirement files), one per line, which images/build.sh mounts read-only at the same
                     path (podman). With --no-local (docker cannot mount at build time) they are left out;
- OUT_DIR/ca.crt     the CA bundle pip trusts here (its `cert`, else REQUESTS_CA_BUNDLE/SSL_CERT_FILE, else
                     the system bundle), empty if there is none.

Standard library only: it runs with the host's python3, before any virtual environment exists.
"""

from __future__ import annotations

import argparse
import ast
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

# Options that would send the venv's packages elsewhere, or caches the build does not want.
DROP = {"user", "target", "prefix", "root", "cache-dir", "no-cache-dir", "src", "log", "cert", "client-cert",
        "config-file"}
PATH_LISTS = {"find-links", "constraint", "requirement", "build-constraint"}
URL_LISTS = {"index-url", "extra-index-url"}
NEVER_MOUNT = {"/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/opt", "/proc", "/root", "/run",
               "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var"}
SYSTEM_CA = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem")


def pip_config(pip: list[str]) -> list[tuple[str, str, str]]:
    """(section, key, value) from `pip config list`; env entries become [global] ones, applied last."""
    try:
        out = subprocess.run([*pip, "config", "list"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"host_pip: `{' '.join(pip)} config list` failed ({exc}); no pip configuration passed",
              file=sys.stderr)
        return []
    files, env = [], []
    for line in out.splitlines():
        name, sep, raw = line.partition("=")
        if not sep or "." not in name:
            continue
        section, _, key = name.rpartition(".")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw.strip("'\"")
        if section == ":env:":
            env.append(("global", key, str(value)))
        else:
            files.append((section, key, str(value)))
    return files + env


def local_path(item: str) -> str | None:
    if item.startswith("file://"):
        return item[len("file://"):]
    if item.startswith("/"):
        return item
    return None


def mount_for(key: str, path: str) -> str:
    """The folder to mount for a path: a `.../simple` index links its files as ../../files, so its parent."""
    parent = os.path.dirname(path)
    if key in URL_LISTS and os.path.basename(path) == "simple" and parent not in NEVER_MOUNT:
        return parent
    return path


def ca_bundle(entries: list[tuple[str, str, str]]) -> str | None:
    for _section, key, value in reversed(entries):
        if key == "cert" and Path(value).is_file():
            return value
    for var in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        if os.environ.get(var) and Path(os.environ[var]).is_file():
            return os.environ[var]
    return next((p for p in SYSTEM_CA if Path(p).is_file()), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--pip", default="", help="the pip command to ask (default: pip3, pip or python3 -m pip)")
    parser.add_argument("--no-local", action="store_true", help="leave out local paths (no build-time mounts)")
    args = parser.parse_args()

    pip = shlex.split(args.pip) if args.pip else (
        [shutil.which("pip3")] if shutil.which("pip3") else
        [shutil.which("pip")] if shutil.which("pip") else [sys.executable, "-m", "pip"])
    entries = pip_config(pip)
    settings: dict[str, dict[str, str]] = {}
    for section, key, value in entries:  # in pip's load order: the last one of a key wins
        if key not in DROP:
            settings.setdefault(section, {})[key] = value
    merged: dict[str, dict[str, str]] = {}
    mounts: list[str] = []
    for section, keys in settings.items():
        for key, value in keys.items():
            if key in PATH_LISTS | URL_LISTS:
                kept = []
                for item in value.split():
                    path = local_path(item)
                    if path is None:
                        kept.append(item)
                    elif not Path(path).exists():
                        print(f"host_pip: {section}.{key}: {path} does not exist here; left out", file=sys.stderr)
                    elif args.no_local or os.path.normpath(path) in NEVER_MOUNT:
                        print(f"host_pip: {section}.{key}: {path} cannot be mounted into this build; left out",
                              file=sys.stderr)
                    else:
                        kept.append(item)
                        mounts.append(mount_for(key, os.path.normpath(path)))
                if not kept:
                    continue
                value = " ".join(kept)
            merged.setdefault(section, {})[key] = value

    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["# The host's pip configuration, merged by images/host_pip.py for an image build."]
    for section, keys in merged.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {v}" for k, v in keys.items()]
    (args.out / "pip.conf").write_text("\n".join(lines) + "\n" if merged else "")
    (args.out / "mounts").write_text("".join(f"{m}\n" for m in dict.fromkeys(mounts)))
    ca = ca_bundle(entries)
    (args.out / "ca.crt").write_bytes(Path(ca).read_bytes() if ca else b"")
    print(f"host_pip: {sum(len(k) for k in merged.values())} pip setting(s), {len(set(mounts))} local path(s), "
          f"CA bundle {ca or 'none'}", file=sys.stderr)


if __name__ == "__main__":
    main()
