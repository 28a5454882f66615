"""Cluster profiles: the facts about a cluster that rendering needs, read from a file, never the live cluster.

Found at `--profile PATH`, else `$MBL_PROFILE`, else `~/.config/mbl/profile.yaml` (XDG_CONFIG_HOME
respected); with none, built-in defaults for a recent Slurm and a plain Kubernetes cluster apply.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from launcher.errors import UsageError
from launcher.spec import Strict, Toleration, check_node_selector, check_setup, label_key


class Partition(Strict):
    name: str
    gpu_types: list[str] = Field(default_factory=list, description="GPU models in this partition (e.g. h100).")
    default: bool = False


class SlurmProfile(Strict):
    version: str = Field("23.11", description="Slurm version (decides how GPUs are requested).")
    partitions: list[Partition] = Field(default_factory=list)
    default_account: str | None = None
    accounts: dict[str, str] = Field(
        default_factory=dict, description="Team -> Slurm account, where they differ (a spec's team `default`, "
        "the one it has when it names none, included): slurm.account, else this, else default_account, else the team.")
    default_qos: str | None = None
    container_runtime: Literal["pyxis", "apptainer", "oci", "none"] = Field(
        "pyxis", description="pyxis/enroot, apptainer, oci (Slurm's own OCI containers: oci.conf + runc, "
        "image: a bundle folder from images/bundle.sh), or none.")
    shared_root: str = Field("/shared", description="Shared storage mounted on every node (and into containers).")
    gpus_per_node_flag: bool | None = Field(
        None, description="Use --gpus-per-node (Slurm >= 19.05); unset decides by version, false uses --gres=gpu:N."
    )
    setup: list[str] = Field(default_factory=list, description="Shell lines every job runs first (modules, venv).")

    @field_validator("setup")
    @classmethod
    def _setup_lines(cls, value: list[str]) -> list[str]:
        return check_setup(value)

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.version.split(".")[:2] if p.isdigit())

    def partition_for(self, gpu_type: str | None) -> str | None:
        if gpu_type:
            for part in self.partitions:
                if gpu_type in part.gpu_types:
                    return part.name
            known = sorted({t for p in self.partitions for t in p.gpu_types})
            if self.partitions:
                raise UsageError(
                    f"no partition of the cluster profile has GPU type {gpu_type!r}",
                    hint=f"set resources.gpu_type to one of {', '.join(known) or '(none listed)'} or slurm.partition",
                )
        for part in self.partitions:
            if part.default:
                return part.name
        return None

    @property
    def use_gpus_per_node(self) -> bool:
        if self.gpus_per_node_flag is not None:
            return self.gpus_per_node_flag
        return self.version_tuple >= (19, 5)


class GpuType(Strict):
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    resource: str = Field("nvidia.com/gpu", description="Extended resource name of this GPU.")

    @field_validator("node_selector")
    @classmethod
    def _selector(cls, value: dict[str, str]) -> dict[str, str]:
        return check_node_selector(value)

    @field_validator("resource")
    @classmethod
    def _resource(cls, value: str) -> str:
        why = label_key(value)
        if why:
            raise ValueError(f"an extended resource name (like nvidia.com/gpu) {why}")
        return value


class K8sProfile(Strict):
    gpu_types: dict[str, GpuType] = Field(default_factory=dict)
    default_namespace: str | None = None


class Profile(Strict):
    name: str = "default"
    slurm: SlurmProfile = Field(default_factory=SlurmProfile)
    k8s: K8sProfile = Field(default_factory=K8sProfile)


def default_path() -> Path:
    if os.environ.get("MBL_PROFILE"):
        return Path(os.environ["MBL_PROFILE"])
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "mbl" / "profile.yaml"


def load_profile(path: str | Path | None = None) -> Profile:
    """The profile at `path`; with no path, the default location if it exists, else built-in defaults."""
    explicit = path is not None or bool(os.environ.get("MBL_PROFILE"))
    target = Path(path) if path else default_path()
    if "\0" in str(target):
        raise UsageError(f"cluster profile {str(target)!r}: a path with a NUL character", hint="pass --profile PATH")
    if not target.exists():
        if explicit:
            raise UsageError(f"cluster profile {target} does not exist", hint="pass --profile PATH to an existing file")
        return Profile()
    from launcher.loading import load_document

    return load_document(target, Profile, "cluster profile")
