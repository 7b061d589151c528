"""What a run leaves at its end for serving (spec.output): the final weights, or the best evaluation's.

final: the live model's weights, gathered from every rank's shards under fsdp (a collective), the base
included, so nothing is loaded or initialised a second time. best: rank 0 reads back the checkpoint
that retention kept for the best evaluation; if it is gone (its save failed), the final weights are
exported instead, and the log says so.
"""

from __future__ import annotations

import logging

from .build import Run
from .export import Exported, Provenance, export_model, token_fingerprint
from .export_checkpoint import stored_weights
from .sharding import gathered_state

log = logging.getLogger("kubetrain.export")


def export_run(run: Run) -> Exported | None:
    """Every rank calls it; rank 0 exports and returns what landed, the others None."""
    spec = run.job.spec
    best = None
    if spec.output.from_ == "best" and run.state.best_step not in (None, run.state.step):
        store = run.checkpointer.store  # every rank looks, so under fsdp all agree on whether to gather
        best = next((c for c in store.list_complete() if c.step == run.state.best_step), None)
        if best is None and run.rt.is_main:
            log.warning("output.from: best: the checkpoint of the best evaluation (step %d) is not in the store; "
                        "exporting the final weights of step %d", run.state.best_step, run.state.step)
    if best is None:
        # the whole live model, base included; a quantized base is not servable as it is: only what LoRA
        # trained, merged later into the unquantized pretrained weights
        whole = spec.model.quantization == "none"
        state = gathered_state(run.model, trained_only=not whole and spec.model.lora is not None)
        if not run.rt.is_main:
            return None
        ckpt = run.checkpointer.latest
        step, metrics, uri = run.state.step, dict(run.state.last_eval or {}), ckpt.uri if ckpt else None
    else:
        if not run.rt.is_main:
            return None
        work = run.opts.work_dir / "best"
        files = run.checkpointer.store.download(best, work / "checkpoint")
        s3 = {"endpoint": spec.checkpoint.endpoint, "region": spec.checkpoint.region}
        state, progress = stored_weights(run.job, run.task, run.tokenizer, files, work, **s3)
        whole, step, metrics, uri = False, best.step, dict(progress.get("last_eval") or {}), best.uri
        log.info("output.from: best: exporting step %d (%s %s)", step, spec.training.early_stopping.metric,
                 metrics.get(spec.training.early_stopping.metric))
    data = {"train": f"{spec.data.train} (tokens {token_fingerprint(run.train_set.input_ids)})"}
    if run.eval_set is not None:
        data["eval"] = f"{spec.data.eval} (tokens {token_fingerprint(run.eval_set.input_ids)})"
    samples = (run.eval_set or run.train_set).input_ids
    return export_model(run.job, run.task, run.tokenizer, state, run.labels, Provenance(step, metrics, uri, data), samples,
                        run.opts.work_dir, whole=whole)
