"""Hub names (``org/name`` or ``org/name@revision``) for ``model.path`` and ``data.path``.

Resolved before any process group exists, through huggingface_hub's own cache and download logic:
``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` (and ``HF_DATASETS_OFFLINE`` for datasets) and the
token from the environment (``HF_TOKEN`` or the stored login; never read or printed here). The config
then points at the local snapshot folder, and ``model.hub_id``/``model.hub_revision`` (``data.*``
alike) record what was resolved, so the saved config names the exact commit.

One rank per node downloads: local rank 0 calls ``snapshot_download`` and hands the result (or its
error line) to the other local ranks through a file in the node's temp folder; they wait for it.
Without a launcher (the CLI's own process, a single rank) the process resolves itself.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_grpo.config.loader import ConfigError

# org/name, optional @revision (branch, tag or commit); what the hub accepts as repo ids.
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
# A model snapshot needs weights, config and tokenizer files; .bin/.pth/onnx/gguf copies are skipped.
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py"]
HANDOFF_WAIT_S = float(os.environ.get("GRPO_HUB_WAIT_S", "7200"))  # a 7B download over a slow link


@dataclass
class Resolved:
    repo_id: str
    revision: str  # the commit the snapshot folder holds
    path: str


def parse_hub_id(value: str) -> tuple[str, str | None] | None:
    """(repo_id, revision) when ``value`` names a hub repo rather than an existing local path."""
    if not value or value.startswith(("/", ".", "~")) or Path(value).expanduser().exists():
        return None
    m = HUB_ID.match(value)
    return (m["repo"], m["rev"]) if m else None


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _download(key: str, repo_id: str, revision: str | None, repo_type: str) -> Resolved:
    """huggingface_hub's snapshot_download; every failure becomes one ConfigError line."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    offline = constants.HF_HUB_OFFLINE or (repo_type == "dataset" and _truthy("HF_DATASETS_OFFLINE"))
    name = repo_id + (f"@{revision}" if revision else "")
    where = f"(cache {cache_dir()})"
    try:
        path = snapshot_download(repo_id, repo_type=repo_type, revision=revision, local_files_only=offline,
                                 allow_patterns=MODEL_FILES if repo_type == "model" else None)
    except GatedRepoError:
        raise ConfigError(f"{key}: {repo_type} {name!r} is gated: accept its terms on the hub and set HF_TOKEN "
                          f"{where}") from None
    except RevisionNotFoundError:
        raise ConfigError(f"{key}: {repo_type} {name!r}: revision {revision!r} does not exist on the hub "
                          f"{where}") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{key}: {repo_type} {name!r} does not exist on the hub (or is private: set HF_TOKEN) "
                          f"{where}") from None
    except LocalEntryNotFoundError:
        why = "offline mode is on" if offline else "the hub is not reachable"
        raise ConfigError(f"{key}: {repo_type} {name!r} is not in the Hugging Face cache {cache_dir()} and {why}; "
                          f"download it first (hf download {repo_id}"
                          f"{' --repo-type dataset' if repo_type == 'dataset' else ''}) or use a local folder") from None
    except (OSError, ValueError) as e:  # HTTP errors, invalid ids, disk full, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ConfigError(f"{key}: cannot resolve {repo_type} {name!r} {where}: {first}") from None
    return Resolved(repo_id=repo_id, revision=Path(path).name, path=str(path))


def _handoff_file(repo_id: str, revision: str | None, repo_type: str) -> Path | None:
    """Where local rank 0 leaves its result for this job's other ranks on the node; None without a launcher."""
    if "LOCAL_RANK" not in os.environ:
        return None
    job = [os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_STEP_ID", "MASTER_ADDR",
                                            "MASTER_PORT", "GROUP_RANK", "SLURM_NODEID")]
    job.append(str(os.getppid()))  # torchrun's agent or slurmstepd: shared by the ranks of a node
    digest = hashlib.sha256("|".join([*job, repo_type, repo_id, revision or ""]).encode()).hexdigest()[:24]
    return Path(tempfile.gettempdir()) / f"megatron-grpo-hub-{os.getuid()}" / f"{digest}.json"


def _parent_started_at() -> float:
    """Start time of the launcher process (a handoff older than it belongs to an earlier job)."""
    try:
        ticks = int(Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()[19])
        btime = next(int(l.split()[1]) for l in Path("/proc/stat").read_text().splitlines() if l.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK") - 2.0
    except (OSError, ValueError, IndexError, StopIteration):
        return 0.0


def resolve(key: str, value: str, *, repo_type: str) -> Resolved | None:
    """The local snapshot of a hub id (None when ``value`` is not one)."""
    parsed = parse_hub_id(value)
    if parsed is None:
        return None
    repo_id, revision = parsed
    handoff = _handoff_file(repo_id, revision, repo_type)
    if handoff is None:
        return _download(key, repo_id, revision, repo_type)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        try:
            result = _download(key, repo_id, revision, repo_type).__dict__
        except ConfigError as e:
            result = {"error": str(e)}
        handoff.parent.mkdir(parents=True, exist_ok=True)
        tmp = handoff.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(handoff)
    else:
        deadline, since = time.monotonic() + HANDOFF_WAIT_S, _parent_started_at()
        while not (handoff.is_file() and handoff.stat().st_mtime >= since):
            if time.monotonic() > deadline:
                raise ConfigError(f"{key}: local rank 0 did not resolve {value!r} within {HANDOFF_WAIT_S:.0f} s "
                                  f"(cache {cache_dir()})")
            time.sleep(0.2)
        result = json.loads(handoff.read_text())
    if "error" in result:
        raise ConfigError(result["error"])
    return Resolved(**result)


def resolve_hub_paths(cfg) -> None:
    """Point ``model.path`` / ``data.path`` at local snapshots when they are hub ids; record id and commit.

    Generated inputs (``model.init=tiny``, ``data.synthetic``) are local folders by definition."""
    for section, repo_type, generated in (("model", "model", cfg.model.init == "tiny"),
                                          ("data", "dataset", bool(cfg.data.synthetic))):
        node = cfg[section]
        if generated:
            continue
        found = resolve(f"{section}.path", str(node.path), repo_type=repo_type)
        if found is not None:
            node.path, node.hub_id, node.hub_revision = found.path, found.repo_id, found.revision
