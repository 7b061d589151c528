"""The operator's brain, as one pure function: what it observes -> what it should do.

`plan(observed, defaults)` reads the TrainingJob, its pods and the clock and returns a Plan: objects to
create, pods to delete, the new status, events, and when to look again. The kopf handlers only
gather the observation and apply the plan, so every transition below is unit-tested as data.

Life of a job: Pending (group created) -> Running (every pod running) -> Succeeded (every pod exited 0).
A preempted or failed pod moves the job to Restarting: the whole group is deleted (graceful: the
trainer saves an emergency checkpoint), and once no pod is left a new group (attempt + 1) is created,
which resumes from the newest checkpoint. Preemptions are free; failures count against backoffLimit.
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import ValidationError

from kubetrain.api import CheckpointRef, OutputRef, SpecError, TrainingJob, TrainingJobStatus
from kubetrain.contracts import TERMINAL_PHASES, Phase, Reason, parse_timestamp, timestamp

from . import builders, gang
from .builders import ClusterDefaults
from .names import ANNOTATION_SPEC_HASH, LABEL_RANK, pod_name
from .records import Event, Observed, Plan, Progress
from .recovery import (PodOutcome, classify, classify_terminated, disruption, observed_time, pod_attempt, trainer_report,
                       waiting_problem)

# A worker that lost contact with a peer usually fails in the same instant as the peer: how long to wait for
# that peer's pod to end on its own and say why, before deleting it unheard (a hung or unreachable node)
PEER_ACCOUNT_GRACE = timedelta(seconds=20)
WAITING = "Waiting"  # condition: the group's pods cannot start, and why
QUEUED = "SchedulingGated"  # a pod's scheduling gate: waiting for admission (Kueue), not stuck


def current_status(job: dict) -> TrainingJobStatus:
    try:
        return TrainingJobStatus.model_validate(job.get("status") or {})
    except ValidationError:  # status written by someone else: start over rather than crash
        return TrainingJobStatus()


def pod_rank(pod: dict) -> int:
    try:
        return int(pod["metadata"].get("labels", {}).get(LABEL_RANK, -1))
    except ValueError:
        return -1


class Decision:
    """What one reconcile decides, accumulated: the new status (conditions, Events) and the plan."""

    def __init__(self, obs: Observed, defaults: ClusterDefaults):
        self.obs, self.defaults = obs, defaults
        self.rdzv_port = builders.rendezvous_port(obs.job["metadata"].get("uid", ""), defaults)
        self.old = current_status(obs.job)
        self.status = self.old.model_dump()
        self.plan = Plan()

    # --- status helpers
    def set(self, **fields) -> None:
        self.status.update(fields)

    def condition(self, type_: str, status: str, reason: str, message: str = "") -> None:
        conds = [dict(c) for c in self.status["conditions"]]
        now = timestamp(self.obs.now)
        for c in conds:
            if c["type"] == type_:
                if c["status"] != status:
                    c["last_transition_time"] = now
                c.update(status=status, reason=reason, message=message or None)
                break
        else:
            conds.append({"type": type_, "status": status, "reason": reason, "message": message or None,
                          "last_transition_time": now})
        self.status["conditions"] = conds

    def condition_reason(self, type_: str) -> tuple[str | None, str | None]:
        for c in self.status["conditions"]:
            if c["type"] == type_ and c["status"] == "True":
                return c["reason"], c["message"]
        return None, None

    def event(self, type_: str, reason: str, message: str) -> None:
        self.plan.events.append(Event(type_, reason, message))

    def enter(self, phase: str, reason: str, message: str, event_type: str = "Normal") -> None:
        """A phase transition: the phase, its condition, the message and an Event, together."""
        if self.status["phase"] == phase and self.status["message"] == message:
            return
        self.set(phase=phase, message=message)
        if phase in (Phase.RUNNING, Phase.RESTARTING, Phase.SUCCEEDED, Phase.FAILED, Phase.SUSPENDED):
            self.condition(phase, "True", reason, message)
        for other in (Phase.RUNNING, Phase.RESTARTING, Phase.SUSPENDED):
            if other != phase:
                self._clear(other, reason)
        self.event(event_type, reason, message)

    def _clear(self, type_: str, reason: str) -> None:
        if any(c["type"] == type_ and c["status"] == "True" for c in self.status["conditions"]):
            self.condition(type_, "False", reason)

    def finish(self) -> Plan:
        generation = self.obs.job["metadata"].get("generation")
        if isinstance(generation, int):
            self.set(observed_generation=generation)
        new = TrainingJobStatus.model_validate(self.status)
        if new != self.old:
            self.plan.status = new.model_dump(by_alias=True, exclude_none=True, mode="json")
        return self.plan


def _progress(b: Decision, pods: list[dict]) -> None:
    """Newest step and checkpoint, from terminated pods' reports and the live scrape; never backwards within
    an attempt, and reset to the truth when an attempt's trainer says where it really started."""
    reports = [(pod_attempt(p), r) for p in pods if (r := trainer_report(p))]
    reports += [(x.attempt, x.report) for x in b.obs.reports]
    live = b.obs.live
    starts = [(a, r.start) for a, r in reports if r.start]
    if live and live.start:
        starts.append((b.status["attempt"], live.start))
    for attempt, start in sorted(starts, key=lambda s: s[0]):
        _started(b, attempt, start)
    since = (b.status["started_from"] or {}).get("attempt", 0)  # older attempts' reports are history now
    for a, r in reports:
        if a >= since and r.outcome == "finished" and isinstance(r.output, dict):
            _exported(b, r.output)
    sources = [Progress(r.step, CheckpointRef(step=r.checkpoint_step, uri=r.checkpoint_uri, time=r.checkpoint_time)
                        if r.checkpoint_step is not None and r.checkpoint_uri else None)
               for a, r in reports if a >= since]
    if live:
        sources.append(live)
    if live and live.total_steps:
        b.set(progress=progress_status(b.status["step"] or live.step or 0, live, b.status["progress"]))
    for p in sources:
        if p.step is not None and p.step > (b.status["step"] or -1):
            b.set(step=p.step)
        last = b.status["last_checkpoint"]
        if p.checkpoint and (last is None or p.checkpoint.step > last["step"]):
            b.set(last_checkpoint=p.checkpoint.model_dump())


def progress_status(step: int, live: Progress, known: dict | None) -> dict:
    """status.progress from a live scrape, rounded so that a status patch is not due at every scrape."""
    total = live.total_steps
    percent = f"{min(100, 100 * max(step, live.step or 0) // total)}%" if total else None
    tokens = live.tokens_per_second
    return {"total_steps": total, "percent": percent,
            "eta": human_duration(live.eta_seconds) if live.eta_seconds is not None else None,
            "tokens_per_second": float(f"{tokens:.3g}") if tokens else None,
            "eval": {k: float(f"{v:.4g}") for k, v in (live.eval or {}).items()} or (known or {}).get("eval") or {}}


def human_duration(seconds: float) -> str:
    """"45s", "12m30s" (under 10 minutes), "42m", "1h05m": coarser as it grows, like kubectl's ages."""
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 3600:
        return f"{s // 60}m"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _exported(b: Decision, output: dict) -> None:
    """The trained model landed (spec.output): status.output, once."""
    try:
        ref = OutputRef.model_validate(output)
    except ValueError:
        return  # a report this operator cannot read: status keeps what it had
    if b.status["output"] != ref.model_dump():
        b.set(output=ref.model_dump())
        b.event("Normal", Reason.MODEL_EXPORTED, f"model exported to {ref.uri} at step {ref.step} ({', '.join(ref.formats)})")


def _started(b: Decision, attempt: int, start: dict) -> None:
    """An attempt's trainer said where it started: status follows (step, lastCheckpoint), with an Event;
    a resume from older than status.lastCheckpoint (or from scratch) means checkpoints were lost: a Warning."""
    known = b.status["started_from"]
    if known and known["attempt"] >= attempt:
        return
    step, ckpt, why = int(start.get("step") or 0), start.get("checkpoint"), start.get("why") or ""
    changed = [str(c) for c in start.get("changed") or []]
    b.set(started_from={"attempt": attempt, "step": step, "checkpoint": ckpt, "why": why or None, "changed": changed})
    last = b.status["last_checkpoint"]
    if ckpt is None and last:
        b.event("Warning", Reason.CHECKPOINTS_LOST, f"attempt {attempt} started from scratch ({why}); status had step "
                f"{b.status['step']} and lastCheckpoint {last['uri']}: reset to step 0")
    elif ckpt is not None and last and last["step"] > step:
        b.event("Warning", Reason.CHECKPOINTS_LOST, f"attempt {attempt} resumed from {ckpt} (step {step}), not from "
                f"lastCheckpoint {last['uri']} (step {last['step']}), which is gone or unusable: {why}")
    elif ckpt is None:
        b.event("Normal", Reason.STARTED_FROM_SCRATCH, f"attempt {attempt} started from scratch: {why}")
    else:
        b.event("Normal", Reason.RESUMED_FROM_CHECKPOINT, f"attempt {attempt} resumed from {ckpt} at step {step}")
    if changed:
        b.event("Normal", Reason.SETTINGS_CHANGED, f"settings changed since {ckpt}; the spec applies from step {step}: "
                + "; ".join(changed))
    b.set(step=step, last_checkpoint={"step": step, "uri": ckpt, "time": None} if ckpt else None)
    if ckpt and last and last["uri"] == ckpt:
        b.set(last_checkpoint=last)  # the same checkpoint: keep its time


def _start_group(b: Decision, job: TrainingJob, attempt: int, ranks: list[int] | None = None) -> None:
    """The ConfigMap, the Service if it is missing, and the pods of `ranks` (default: all) of an attempt."""
    owner = builders.owner_reference(b.obs.job)
    config, pods = builders.group(job, owner, attempt, b.rdzv_port)
    b.plan.replace_config = config
    # create-only: an existing Secret keeps its id (kube checks it is this job's), a NetworkPolicy is left as is
    b.plan.create.append(builders.rendezvous_secret(job, owner, b.obs.token))
    if b.defaults.network_policy:
        b.plan.create.append(builders.network_policy(job, owner, b.defaults))
    if not b.obs.has_service:
        b.plan.create.append(builders.service(job, owner, b.rdzv_port))
    group = builders.pod_group(job, owner, attempt)
    if group is not None:  # create-only, before the pods: the gang scheduler waits for the pods it names
        b.plan.create.append(group)
        if ranks is None and attempt > 1:
            b.plan.delete_pod_groups.append(gang.pod_group_ref(job, attempt - 1))
    if b.obs.predecessor_pods:  # same names: they are created once the garbage collector has taken those
        b.set(message=f"waiting for {b.obs.predecessor_pods} pod(s) of a deleted TrainingJob of this name to go")
        b.plan.requeue_after = 1.0
    else:
        b.plan.create.extend(p for p in pods if ranks is None or pod_rank(p) in ranks)
    b.set(attempt=attempt, group_generation=b.obs.job["metadata"].get("generation"))


def _delete_all(b: Decision, pods: list[dict]) -> None:
    b.plan.delete_pods.extend(p for p in pods if not p["metadata"].get("deletionTimestamp"))


def _fail(b: Decision, reason: str, message: str, pods: list[dict]) -> None:
    b.enter(Phase.FAILED, reason, message, "Warning")
    b.set(completion_time=b.status["completion_time"] or timestamp(b.obs.now))
    _delete_all(b, [p for p in pods if classify(p).kind in ("running", "pending")])


def plan(obs: Observed, defaults: ClusterDefaults = ClusterDefaults()) -> Plan:
    b = Decision(obs, defaults)
    phase = b.status["phase"]
    pods = obs.pods
    if obs.job["metadata"].get("deletionTimestamp"):
        return b.plan  # owner references take the children with it

    try:
        job = builders.job_from_object(obs.job, defaults)
    except SpecError as err:
        if phase != Phase.FAILED:
            b.enter(Phase.FAILED, Reason.INVALID_SPEC, f"invalid TrainingJob: {err}".replace("\n", "; "), "Warning")
            b.set(completion_time=timestamp(obs.now))
            _delete_all(b, pods)
        return b.finish()
    policy = job.spec.run_policy

    if obs.foreign and phase not in TERMINAL_PHASES:
        _fail(b, Reason.NAME_CONFLICT, obs.foreign, pods)
        return b.finish()
    if obs.unserved and phase not in TERMINAL_PHASES:
        _fail(b, Reason.POD_GROUP_UNAVAILABLE, obs.unserved, pods)
        return b.finish()
    if phase in TERMINAL_PHASES:
        return _finished(b, job, pods)
    if policy.suspend:
        return _suspend(b, pods)
    if phase == Phase.SUSPENDED:
        return _resume(b, job, pods)

    deadline = policy.active_deadline_seconds
    started = parse_timestamp(b.status["start_time"])
    if deadline and started and obs.now - started >= timedelta(seconds=deadline):
        _fail(b, Reason.DEADLINE_EXCEEDED, f"the job ran longer than activeDeadlineSeconds ({deadline}s)", pods)
        return b.finish()
    if deadline and started:
        b.plan.requeue_after = max(0.5, (started + timedelta(seconds=deadline) - obs.now).total_seconds())

    if phase is None or (phase == Phase.PENDING and b.status["attempt"] == 0):
        _start_group(b, job, 1)
        b.set(start_time=timestamp(obs.now), phase=Phase.PENDING)
        b.condition("Created", "True", Reason.GROUP_CREATED, f"created {job.spec.nodes} pods (attempt 1)")
        b.event("Normal", Reason.CREATED, f"created service and {job.spec.nodes} pods (attempt 1)")
        return b.finish()
    if phase == Phase.RESTARTING:
        return _restarting(b, job, pods)
    return _watch_group(b, job, pods)


def _watch_group(b: Decision, job: TrainingJob, pods: list[dict]) -> Plan:
    """Pending/Running: the current attempt's pods decide."""
    attempt = b.status["attempt"]
    mine = {pod_rank(p): p for p in pods if pod_attempt(p) == attempt}
    stale = [p for p in pods if pod_attempt(p) != attempt]
    _delete_all(b, stale)
    _progress(b, list(mine.values()))
    running_before = b.status["phase"] == Phase.RUNNING
    outcomes: dict[int, PodOutcome] = {rank: classify(p) for rank, p in mine.items()}
    missing = [r for r in range(job.spec.nodes) if r not in mine]
    if missing and running_before:
        for r in missing:
            outcomes[r] = PodOutcome("preempted", Reason.PREEMPTED, f"pod {pod_name(job.metadata.name, r)} disappeared")
    elif missing:  # still starting (or the operator stopped mid-creation): create what is missing
        _start_group(b, job, attempt, missing)

    kinds = {o.kind for o in outcomes.values()}
    first = lambda kind: next(o for o in outcomes.values() if o.kind == kind)  # noqa: E731
    outdated = _outdated(b, job, mine.values())
    if outdated and kinds <= {"running", "pending"}:  # a graceful restart applies it: checkpoint, resume
        b.enter(Phase.RESTARTING, Reason.SPEC_CHANGED, outdated)
        _delete_all(b, list(mine.values()))
    elif "preempted" in kinds:
        o = first("preempted")
        b.enter(Phase.RESTARTING, Reason.PREEMPTED, o.message, "Warning")
        _delete_all(b, list(mine.values()))
    elif "invalid" in kinds:
        _fail(b, Reason.INVALID_SPEC, first("invalid").message, list(mine.values()))
    elif "permanent" in kinds:  # another attempt would fail the same way
        o = first("permanent")
        _fail(b, o.reason, o.message, list(mine.values()))
    elif "failed" in kinds and (wait := _peer_account_due(b, outcomes.values())):
        b.plan.requeue_after = min(wait, b.plan.requeue_after or wait)  # its pod's next change also wakes us
    elif "failed" in kinds:
        o = cause([o for o in outcomes.values() if o.kind == "failed"])
        b.enter(Phase.RESTARTING, Reason.POD_FAILED, o.message, "Warning")
        _delete_all(b, list(mine.values()))
    elif not missing and kinds == {"succeeded"}:
        step = b.status["step"]
        ckpt = b.status["last_checkpoint"]
        msg = f"training finished at step {step}" + (f"; last checkpoint {ckpt['uri']}" if ckpt else "")
        b.enter(Phase.SUCCEEDED, Reason.JOB_SUCCEEDED, msg)
        b.set(completion_time=timestamp(b.obs.now))
        if b.status["progress"]:
            b.set(progress={**b.status["progress"], "percent": "100%", "eta": None})
        return _finished(b, job, pods)
    elif not missing and kinds <= {"running", "succeeded"}:
        b.enter(Phase.RUNNING, Reason.GROUP_RUNNING, f"all {job.spec.nodes} pods running (attempt {attempt})")
    elif b.status["phase"] != Phase.PENDING and not running_before:
        b.set(phase=Phase.PENDING)
    if b.status["phase"] == Phase.PENDING and _waiting(b, job, list(mine.values())):
        return b.finish()
    if b.status["phase"] != Phase.PENDING:
        b._clear(WAITING, Reason.PODS_STARTED)
    b.plan.live = b.status["phase"] == Phase.RUNNING  # its progress is scraped again on the progress cadence
    return b.finish()


def _waiting(b: Decision, job: TrainingJob, pods: list[dict]) -> bool:
    """A Pending group: say why pods cannot start (condition Waiting, an Event, the message), and fail the job past
    runPolicy.schedulingTimeoutSeconds. True when it failed. Not a training failure: backoffLimit is untouched."""
    problems = [found for p in pods if classify(p).kind == "pending" and (found := waiting_problem(p))]
    message = "its pods are still pending"
    if problems:
        reason, message = problems[0]
        if len(problems) > 1:
            message += f" (and {len(problems) - 1} more pod(s))"
        queued = all(r == QUEUED for r, _ in problems)
        if b.condition_reason(WAITING) != (reason, message):
            b.condition(WAITING, "True", reason, message)
            b.event("Normal" if queued else "Warning", reason, message)
        b.set(message=message)
        if queued:  # time in a queue is not time failing to start (Kueue's waitForPodsReady has its own timeout)
            return False
    else:
        b._clear(WAITING, Reason.PODS_STARTED)
    limit = job.spec.run_policy.scheduling_timeout_seconds
    created = [t for p in pods if (t := observed_time(p["metadata"].get("creationTimestamp")))]
    if not limit or not created:
        return False
    waited = (b.obs.now - min(created)).total_seconds()
    if waited < limit:
        b.plan.requeue_after = min(limit - waited, b.plan.requeue_after or limit - waited)
        return False
    why = f"the group did not start within runPolicy.schedulingTimeoutSeconds ({limit}s): {message}"
    if job.spec.run_policy.scheduling_timeout_policy == "Suspend":
        _suspend_unplaced(b, why, pods)
    else:
        _fail(b, Reason.SCHEDULING_TIMEOUT, why, pods)
    return True


def _suspend_unplaced(b: Decision, why: str, pods: list[dict]) -> None:
    """schedulingTimeoutPolicy Suspend: the status says so first, then spec.runPolicy.suspend is set as a user
    would set it (so resuming is the user's usual edit), and the pods go."""
    b.plan.suspend_job = True
    b.enter(Phase.SUSPENDED, Reason.SCHEDULING_TIMEOUT, f"suspended: {why}; set spec.runPolicy.suspend to false to "
            "try again", "Warning")
    _delete_all(b, pods)


def _peer_account_due(b: Decision, outcomes) -> float | None:
    """Seconds to wait before restarting when every failed pod only lost contact with a peer that still shows
    running: the peer is failing too, and deleting it now would lose its account of why. None: decide now."""
    outcomes = list(outcomes)
    failed = [o for o in outcomes if o.kind == "failed"]
    if not all(o.symptom for o in failed) or not any(o.kind in ("running", "pending") for o in outcomes):
        return None
    seen = [o.finished_at for o in failed if o.finished_at]
    if len(seen) < len(failed):  # no kubelet time to wait from: decide now
        return None
    left = (min(seen) + PEER_ACCOUNT_GRACE - b.obs.now).total_seconds()
    return min(1.0, left) if left > 0 else None


def cause(failures: list[PodOutcome]) -> PodOutcome:
    """Of a group's failed pods, the one that says why: not a peer that only lost contact with it."""
    return next((o for o in failures if not o.symptom), failures[0])


def _outdated(b: Decision, job: TrainingJob, pods) -> str | None:
    """Why the running group must be replaced to run the current spec (None: it runs it)."""
    want = builders.spec_hash(job)
    if not any(p["metadata"].get("annotations", {}).get(ANNOTATION_SPEC_HASH, want) != want for p in pods):
        return None
    was, now = b.status["group_generation"], b.obs.job["metadata"].get("generation")
    return (f"the spec changed (generation {was} -> {now}): restarting the group to apply it; each pod saves a "
            "checkpoint first and the new group resumes there")


def _restarting(b: Decision, job: TrainingJob, pods: list[dict]) -> Plan:
    """Wait until the old group is gone, then decide: a new attempt, or Failed past backoffLimit."""
    reason, message = b.condition_reason(Phase.RESTARTING)
    if reason == Reason.POD_FAILED:  # a preemption seen late (e.g. node loss) still wins over the failure it caused
        evidence = next((f"pod {p['metadata']['name']}: {e}" for p in pods if (e := disruption(p))), None)
        if evidence:
            reason, message = Reason.PREEMPTED, evidence
            b.condition(Phase.RESTARTING, "True", reason, message)
            b.set(message=message)
    _progress(b, pods)
    # the old group's pods are being deleted; what they reported (or reported before they went) still counts
    permanent = next((r for r in [*map(trainer_report, pods), *(x.report for x in b.obs.reports)]
                      if r and r.outcome == "failed" and r.permanent and r.message), None)
    if reason == Reason.POD_FAILED and permanent:  # a peer's failure was seen first; the cause is permanent
        _fail(b, permanent.reason or Reason.POD_FAILED, permanent.message, pods)
        return b.finish()
    # this attempt's failed pods, listed now or seen terminating on a watch event before they went
    ended = [*map(classify_terminated, pods),
             *(x.outcome for x in b.obs.reports if x.attempt == b.status["attempt"] and x.outcome)]
    failed = [o for o in ended if o.kind == "failed"]
    if reason == Reason.POD_FAILED and failed and not cause(failed).symptom and cause(failed).message != message:
        message = cause(failed).message  # the failed pod's own account, seen after its peers' "lost contact"
        b.condition(Phase.RESTARTING, "True", reason, message)
        b.set(message=message)
    if pods:
        _delete_all(b, pods)
        b.plan.requeue_after = 1.0
        return b.finish()
    if reason == Reason.PREEMPTED:
        b.set(preemptions=b.status["preemptions"] + 1)
    elif reason == Reason.SPEC_CHANGED:
        pass  # asked for: neither a preemption nor a failure
    else:
        failures = b.status["failures"] + 1
        b.set(failures=failures)
        limit = job.spec.run_policy.backoff_limit
        if failures > limit:
            _fail(b, Reason.BACKOFF_LIMIT_EXCEEDED, f"failed {failures} times (backoffLimit {limit}); last: {message}", [])
            return b.finish()
    attempt = b.status["attempt"] + 1
    b.set(restarts=b.status["restarts"] + 1)
    _start_group(b, job, attempt)
    b.set(phase=Phase.PENDING)
    b.event("Normal", Reason.RESTARTED, f"recreated the group (attempt {attempt}) after {reason}: {message}")
    return b.finish()


def _suspend(b: Decision, pods: list[dict]) -> Plan:
    """Suspended at once; reason Suspending while pods save their checkpoint, JobSuspended once none is left
    (then step and lastCheckpoint are final: what a resume starts from)."""
    _progress(b, pods)
    _delete_all(b, pods)
    if b.condition_reason(Phase.SUSPENDED)[0] == Reason.SCHEDULING_TIMEOUT:  # suspended by us: why stays readable
        b.plan.requeue_after = 1.0 if pods else None
        return b.finish()
    if pods:
        b.enter(Phase.SUSPENDED, Reason.SUSPENDING, f"runPolicy.suspend is true: stopping {len(pods)} pod(s), each saves "
                "a checkpoint first")
        b.plan.requeue_after = 1.0
    else:
        ckpt = b.status["last_checkpoint"]
        b.enter(Phase.SUSPENDED, Reason.JOB_SUSPENDED, f"suspended at step {b.status['step'] or 0}: no pod left; resumes from "
                + (ckpt["uri"] if ckpt else "scratch (no checkpoint yet)"))
    return b.finish()


def _resume(b: Decision, job: TrainingJob, pods: list[dict]) -> Plan:
    unplaced = b.condition_reason(Phase.SUSPENDED)[0] == Reason.SCHEDULING_TIMEOUT
    if unplaced and b.old.observed_generation == b.obs.job["metadata"].get("generation"):
        b.plan.suspend_job = True  # our spec write did not land (the spec is as we suspended it): write it again
        _delete_all(b, pods)
        return b.finish()
    if pods:  # the suspended group is still saving its checkpoint
        _delete_all(b, pods)
        b.plan.requeue_after = 1.0
        return b.finish()
    attempt = b.status["attempt"] + 1
    _start_group(b, job, attempt)
    b.set(phase=Phase.PENDING, message=f"resumed (attempt {attempt})", start_time=timestamp(b.obs.now))
    b.condition(Phase.SUSPENDED, "False", Reason.JOB_RESUMED, f"resumed (attempt {attempt})")
    b.event("Normal", Reason.RESUMED, f"resumed: created {job.spec.nodes} pods (attempt {attempt})")
    return b.finish()


def _finished(b: Decision, job: TrainingJob, pods: list[dict]) -> Plan:
    """Clean up per cleanPodPolicy; delete the job itself ttlSecondsAfterFinished after completion. A report
    that arrives after the end (rank 0's pod terminating after its peer's failure decided it) still counts."""
    _progress(b, pods)
    policy = job.spec.run_policy
    if policy.clean_pod_policy == "All":
        _delete_all(b, pods)
    elif policy.clean_pod_policy == "Running":
        _delete_all(b, [p for p in pods if classify(p).kind in ("running", "pending")])
    ttl = policy.ttl_seconds_after_finished
    done = parse_timestamp(b.status["completion_time"])
    if ttl is not None and done:
        remaining = (done + timedelta(seconds=ttl) - b.obs.now).total_seconds()
        if remaining <= 0:
            b.plan.delete_job = True
        else:
            b.plan.requeue_after = remaining
    return b.finish()
