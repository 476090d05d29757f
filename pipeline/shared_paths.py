"""On a cluster of several nodes, the run's local paths must name the same files on every node.

Every node works on a run: its read tasks read the input, its actors load the model and read images
under the image root, its write tasks write the output. A folder on the driver's own disk is not on
the others': their reads fail (every row of theirs an error row, or the run failed), and their
writes land on their own disks, out of the output the driver counts and a resume reads. Before any
work, each other node is asked what it sees at those paths: the output's run manifest, which the
driver has just written (the same bytes: a folder every node shares), and a sample of the input's,
the model's and the adapter's files (the same sizes: a copy on each node's disk will do for what is
only read).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import fsspec

from .config import PipelineConfig
from .io import parquet_files
from .manifest import manifest_path
from .storage import is_local

SAMPLED_INPUT_FILES = 32
NODE_ANSWER_S = 60.0
RECHECK_WAITS_S = (2, 4, 8, 16, 32)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Expected:
    """What the driver sees at one path the run uses; `digest` where the bytes must be the same."""
    flag: str
    path: str
    size: int | None        # None: a folder
    digest: str | None = None


def local_path(uri: str) -> str:
    return os.path.expanduser(fsspec.core.strip_protocol(uri))


def file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def seen(flag: str, path: str, digest: bool = False) -> Expected:
    p = Path(path)
    if p.is_dir():
        return Expected(flag, path, None)
    return Expected(flag, path, p.stat().st_size, file_digest(path) if digest else None)


def sample(paths: list[str], n: int) -> list[str]:
    """At most `n` of `paths`, spread over them (the first and the last included)."""
    if len(paths) <= n:
        return paths
    return [paths[round(i * (len(paths) - 1) / (n - 1))] for i in range(n)]


def checkpoint_files(folder: str) -> list[str]:
    """A local checkpoint's (or adapter's) configs and weights."""
    p = Path(folder)
    if not p.is_dir():      # a hub id: each node's own cache
        return []
    return sorted(str(f) for f in p.iterdir() if f.is_file() and f.suffix in (".json", ".safetensors"))


def expected_paths(input_uri: str, output_uri: str, config: PipelineConfig) -> list[Expected]:
    """What every node must see as the driver does, for the run's local paths (none for URLs)."""
    found: list[Expected] = []
    if is_local(output_uri):
        found.append(seen("--output (its run manifest)", local_path(manifest_path(output_uri)), digest=True))
    if is_local(input_uri):
        found += [seen("--input", p) for p in sample(parquet_files(input_uri, config.storage_options),
                                                     SAMPLED_INPUT_FILES)]
    for flag, folder in (("--model", config.model), ("--adapter", config.adapter)):
        if folder and is_local(folder):
            found += [seen(flag, p) for p in checkpoint_files(local_path(folder))]
    if config.image_root and is_local(config.image_root):
        found.append(seen("--image-root", local_path(config.image_root)))
    return found


def differences(expected: list[Expected]) -> list[str]:
    """What this node sees otherwise than the driver, one line a path (empty: all the same)."""
    out = []
    for e in expected:
        try:
            found = difference(e)
        except OSError as error:    # unreadable there: as good as another file
            found = f"cannot be read there ({type(error).__name__}: {error})"
        if found:
            out.append(f"{e.flag}: {e.path} {found}")
    return out


def difference(e: Expected) -> str | None:
    p = Path(e.path)
    if not p.exists():
        return "does not exist there"
    if e.size is None:
        return None if p.is_dir() else "is not a folder there"
    if not p.is_file() or p.stat().st_size != e.size:
        return f"is another file there ({p.stat().st_size} bytes, here {e.size})"
    if e.digest is not None and file_digest(e.path) != e.digest:
        return "is another file there (this run's, just written here, is not)"
    return None


def working_nodes() -> list[dict]:
    """The cluster's alive nodes that can take the run's work (a node of no CPU nor GPU takes none),
    but the driver's."""
    import ray

    me = ray.get_runtime_context().get_node_id()
    return [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != me
            and (n["Resources"].get("CPU", 0) > 0 or n["Resources"].get("GPU", 0) > 0)]


def check_nodes_share_paths(input_uri: str, output_uri: str, config: PipelineConfig) -> None:
    """Refuses a run whose local paths other nodes of the cluster do not see as the driver does
    (ValueError naming the node, the flag and the path); a node that does not answer within
    NODE_ANSWER_S is warned of, not waited for. A node that lacks only the run manifest just written
    is asked again for a minute first: a shared file system's client may answer from its cache for
    that long (NFS keeps a folder's listing up to 60 s)."""
    nodes = working_nodes()
    expected = expected_paths(input_uri, output_uri, config) if nodes else []
    if not expected:
        return
    refused = ask_nodes(nodes, expected)
    for wait in RECHECK_WAITS_S:
        if not refused or not all(only_fresh(found, expected) for _, found in refused):
            break
        time.sleep(wait)
        refused = ask_nodes([node for node, _ in refused], expected)
    if refused:
        node, found = refused[0]
        others = f" (and {len(refused) - 1} other nodes)" if len(refused) > 1 else ""
        raise ValueError(f"node {node_name(node)}{others} of the cluster does not see this machine's files: "
                         + "; ".join(found[:3]) + ". Every node works on the run: on a cluster of several nodes, "
                         "name folders all nodes share (NFS, a mounted volume) or an object store's URLs (s3://...)")


def ask_nodes(nodes: list[dict], expected: list[Expected]) -> list[tuple[dict, list[str]]]:
    """Each node that answers and sees otherwise, with what it sees (a task pinned to each)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    look = ray.remote(num_cpus=0, max_retries=0)(differences)
    asked = {look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(expected):
             n for n in nodes}
    answered, late = ray.wait(list(asked), num_returns=len(asked), timeout=NODE_ANSWER_S)
    for ref in late:
        log.warning("node %s did not say within %g s whether it sees the run's local paths: not checked",
                    node_name(asked[ref]), NODE_ANSWER_S)
    return [(asked[ref], found) for ref in answered if (found := node_answer(ref, asked[ref]))]


def only_fresh(found: list[str], expected: list[Expected]) -> bool:
    """Whether a node's differences are all of files the driver has just written (those with a digest)."""
    fresh = tuple(f"{e.flag}: {e.path} " for e in expected if e.digest is not None)
    return bool(fresh) and all(line.startswith(fresh) for line in found)


def node_answer(ref, node: dict) -> list[str]:
    """A node's differences; none from a node that died meanwhile (warned of: the run goes on without it)."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayError as e:
        cause = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        log.warning("node %s could not say whether it sees the run's local paths (%s): not checked",
                    node_name(node), cause)
        return []


def job_working_copy() -> str | None:
    """Where a job submitted with a working_dir runs: Ray's copy of that folder, made for the job (and
    deleted once unused: a later job of other code gets another), not the user's folder."""
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        return None
    return os.getcwd() if isinstance(job, dict) and (job.get("runtime_env") or {}).get("working_dir") else None


def check_output_outlives_job(output_uri: str) -> None:
    """Refuses an output in a submitted job's copy of its working dir (a relative --output there, as
    typed on the user's machine): the answers went to a temporary folder of the head's."""
    copy = job_working_copy()
    if copy is None or not is_local(output_uri):
        return
    path = os.path.abspath(local_path(output_uri))
    if path == copy or path.startswith(copy.rstrip("/") + "/"):
        raise ValueError(f"output {path!r} lies in this job's copy of its --working-dir ({copy}), which Ray made for "
                         "the job and deletes once unused (a resume with other code would not find it): name the "
                         "output by an absolute path (a folder every node shares) or a URL (s3://...)")


def node_name(node: dict) -> str:
    return f"{node['NodeManagerAddress']} (id {node['NodeID'][:8]})"
