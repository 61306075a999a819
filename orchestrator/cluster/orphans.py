"""Placement groups that outlived the job that made them, freed when a job joins a running cluster.

Ray Train V2 inside a Tune trial can leave one behind: a sweep stopped by Ctrl-C while a trial trains
(Tune kills the trial's actor when it does not stop within 10 s), the run's controller sees its worker
group fail, retries, reserves a new placement group, and dies with the trial an instant later, after
Ray Train's PlacementGroupCleaner has already exited. The group stays CREATED with nothing in it,
its CPUs reserved until the cluster stops. Seen here (2026-12-02): a resumed sweep's Ray Train run waited
without end for the one CPU such a group held on a 2-CPU cluster.

What is removed, all conditions at once: the group holds resources (CREATED), was not made to outlive
its job (not detached), its job has ended, and no actor of that job is alive (a live actor, detached
ones included, may still mean to use it).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import ray

ENDED = {"SUCCEEDED", "FAILED", "STOPPED"}


def orphaned(groups: Iterable[Any], jobs: Iterable[Any], alive_actors: Iterable[Any]) -> list[Any]:
    """The groups (Ray state API records) to remove, from the cluster's groups, jobs and alive actors."""
    ended = {job.job_id for job in jobs if job.job_id and str(job.status).rsplit(".", 1)[-1] in ENDED}
    still_acting = {actor.job_id for actor in alive_actors}
    return [g for g in groups if g.state == "CREATED" and not g.is_detached and g.creator_job_id in ended and g.creator_job_id not in still_acting]


def orphaned_groups(address: str) -> list[Any]:
    """This cluster's orphaned placement groups, as Ray's state API lists them; raises when that API does not answer."""
    from ray.util.state import list_actors, list_jobs, list_placement_groups

    groups = list_placement_groups(address, filters=[("state", "=", "CREATED")], detail=True, limit=10_000, raise_on_missing_output=False)
    if not groups:
        return []
    alive = list_actors(address, filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False)
    return orphaned(groups, list_jobs(address, raise_on_missing_output=False), alive)


def free_orphaned_placement_groups() -> list[str]:
    """Remove this cluster's orphaned placement groups (see the module's docstring); returns their ids.

    Needs Ray's state API (the dashboard): without it, nothing is removed and the job runs as before."""
    from ray.util.placement_group import PlacementGroup

    try:
        # The connected cluster's address, not "auto": that fails when another Ray runs on this host.
        groups = orphaned_groups(ray.get_runtime_context().gcs_address)
    except Exception as exc:  # no dashboard, or it does not answer: the check is best effort
        print(f"warning: could not list the cluster's placement groups ({type(exc).__name__}: {exc}); none freed", file=sys.stderr)
        return []
    for group in groups:
        ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group.placement_group_id)))
        cpus = sum(bundle.get("unit_resources", {}).get("CPU", 0) for bundle in group.bundles or [])
        print(f"freed placement group {group.placement_group_id} ({cpus:g} CPU) left reserved by ended job {group.creator_job_id}", file=sys.stderr)
    return [group.placement_group_id for group in groups]
