"""Grafana dashboards as code (grafana-foundation-sdk builders; the JSON is generated, never edited).

- `kubetrain-training`: one or more TrainingJobs (variables `namespace`, `trainingjob`): progress
  (step, progress, ETA, loss, eval metrics, learning rate, gradient norm), throughput (samples/s,
  real tokens/s, padding, model FLOP/s, MFU where the GPU is known), goodput, checkpoints (age of the
  newest, duration by phase, size, count by reason, failures).
- `kubetrain-fleet`: the operator's view (jobs by phase, transitions, restarts by reason,
  preemptions, reconcile latency and errors) and a table of the training jobs.

Every panel queries the `${datasource}` Prometheus data source variable. Trainer series are selected by
the `namespace` and `trainingjob` target labels (see the package docstring).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from grafana_foundation_sdk.builders import common as gc
from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.builders import prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as pm

from kubetrain.contracts import OperatorMetric as O
from kubetrain.contracts import TrainerMetric as M
from kubetrain.contracts import total

from . import JOB_LABEL

DASHBOARD_DIR = "dashboards"  # under the chart directory
DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
SEL = f'{{namespace=~"$namespace", {JOB_LABEL}=~"${JOB_LABEL}"}}'  # the selected jobs' trainer series
BY_JOB = f"namespace, {JOB_LABEL}"
LEGEND = f"{{{{namespace}}}}/{{{{{JOB_LABEL}}}}}"
RATE = "$__rate_interval"


def per_job(metric: str, extra_by: str = "", sel: str = SEL) -> str:
    """The newest value of a trainer gauge per job (rank 0 serves it; a restarted pod keeps the name)."""
    return f"max by ({BY_JOB}{', ' + extra_by if extra_by else ''}) ({metric}{sel})"


def checkpoint_age(sel: str = SEL) -> str:
    """Seconds since the newest complete checkpoint (0 means none yet in this attempt: no series)."""
    return f"time() - max by ({BY_JOB}) ({M.LAST_CHECKPOINT_TIMESTAMP}{sel} > 0)"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = LEGEND
    instant: bool = False
    unit: str | None = None  # a table column's unit


@dataclass(frozen=True)
class Panel:
    kind: str  # "timeseries", "stat" or "table"
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    width: int = 8
    height: int = 8
    options: dict = field(default_factory=dict)  # min, max, decimals, stack


def ts(title: str, description: str, *queries: Query, **kw) -> Panel:
    return Panel("timeseries", title, description, queries, **kw)


def st(title: str, description: str, *queries: Query, **kw) -> Panel:
    return Panel("stat", title, description, queries, **{"width": 4, "height": 4, **kw})


def tbl(title: str, description: str, *queries: Query, **kw) -> Panel:
    return Panel("table", title, description, queries, **{"width": 24, **kw})


def _target(q: Query, ref: str, table_format: bool) -> prometheus.Dataquery:
    t = prometheus.Dataquery().expr(q.expr).legend_format(q.legend).ref_id(ref).datasource(DATASOURCE)
    if q.instant or table_format:
        t = t.instant()
    else:
        t = t.range()
    if table_format:
        t = t.format(pm.PromQueryFormat.TABLE)
    return t


def _build_panel(p: Panel, panel_id: int):
    builder = {"timeseries": timeseries.Panel, "stat": stat.Panel, "table": table.Panel}[p.kind]()
    b = (builder.id(panel_id).title(p.title).description(p.description).datasource(DATASOURCE)
         .unit(p.unit).span(p.width).height(p.height))
    for i, q in enumerate(p.queries):
        b = b.with_target(_target(q, chr(ord("A") + i), p.kind == "table"))
    opts = p.options
    if "min" in opts:
        b = b.min(opts["min"])
    if "max" in opts:
        b = b.max(opts["max"])
    if "decimals" in opts:
        b = b.decimals(opts["decimals"])
    if p.kind == "timeseries":
        b = (b.fill_opacity(10).line_width(1).show_points(common.VisibilityMode.NEVER)
             .legend(gc.VizLegendOptions().show_legend(True).display_mode(common.LegendDisplayMode.LIST)
                     .placement(common.LegendPlacement.BOTTOM)))
        if opts.get("stack"):
            b = b.stacking(gc.StackingConfig().mode(common.StackingMode.NORMAL))
    if p.kind == "stat":
        b = b.graph_mode(common.BigValueGraphMode.AREA).reduce_options(
            gc.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    if p.kind == "table":
        # one row per job: join the instant queries on their labels, drop the per-query Time columns
        b = b.with_transformation(dm.DataTransformerConfig(id_val="merge", options={}))
        b = b.with_transformation(dm.DataTransformerConfig(
            id_val="organize", options={"excludeByName": {"Time": True},
                                        "renameByName": {f"Value #{chr(ord('A') + i)}": q.legend
                                                         for i, q in enumerate(p.queries)}}))
        for q in p.queries:
            if q.unit:
                b = b.override_by_name(q.legend, [dm.DynamicConfigValue(id_val="unit", value=q.unit)])
    return b


@dataclass(frozen=True)
class DashboardSpec:
    name: str  # file name and uid
    title: str
    description: str
    rows: tuple[tuple[str, tuple[Panel, ...]], ...]
    job_variables: bool  # namespace / trainingjob variables


def _variables(spec: DashboardSpec) -> list:
    out = [gd.DatasourceVariable("datasource").label("Data source").type("prometheus")]
    if spec.job_variables:
        for name, query in (("namespace", f"label_values({M.STEP}, namespace)"),
                            (JOB_LABEL, f'label_values({M.STEP}{{namespace=~"$namespace"}}, {JOB_LABEL})')):
            out.append(gd.QueryVariable(name).label(name.capitalize() if name == "namespace" else "TrainingJob")
                       .datasource(DATASOURCE).query(query).multi(True).include_all(True).all_value(".*")
                       .current(dm.VariableOption(selected=True, text="All", value="$__all"))
                       .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.ALPHABETICAL_ASC))
    return out


def build(spec: DashboardSpec) -> dm.Dashboard:
    b = (gd.Dashboard(spec.title).uid(spec.name).description(spec.description).tags(["kubetrain"])
         .editable().refresh("30s").time("now-6h", "now").timezone("browser")
         .tooltip(dm.DashboardCursorSync.CROSSHAIR))
    for variable in _variables(spec):
        b = b.with_variable(variable)
    panel_id = 0
    for row_title, panels in spec.rows:
        panel_id += 1
        b = b.with_row(gd.Row(row_title).id(panel_id))
        for p in panels:
            panel_id += 1
            b = b.with_panel(_build_panel(p, panel_id))
    return b.build()


# ------------------------------------------------------------------------------------------ training

TRAINING = DashboardSpec(
    name="kubetrain-training",
    title="kubetrain / Training jobs",
    description="Progress, throughput, goodput and checkpoints of TrainingJobs (the trainer's rank-0 metrics).",
    job_variables=True,
    rows=(
        ("Progress", (
            st("Progress", "Optimizer steps done / steps the run will take.",
               Query(f"{per_job(M.STEP)} / {per_job(M.TOTAL_STEPS)}"),
               unit="percentunit", options={"min": 0, "max": 1}),
            st("Step", "Optimizer steps completed.", Query(per_job(M.STEP))),
            st("ETA", "Estimated time to the last step, from the last logging window's step time.",
               Query(per_job(M.ETA_SECONDS)), unit="s"),
            st("Epoch", "Current epoch (0-based, fractional).", Query(per_job(M.EPOCH)),
               options={"decimals": 2}),
            st("World size", "Training processes in the group (nodes x procsPerNode).",
               Query(per_job(M.WORLD_SIZE))),
            st("Resumed from step", "Step this attempt resumed from (0: a fresh start).",
               Query(per_job(M.RESUMED_FROM_STEP))),
            ts("Training loss", "Mean training loss over the last logging window, all ranks.",
               Query(per_job(M.LOSS))),
            ts("Eval metrics", "Latest evaluation metrics (eval_loss, eval_f1, perplexity, ...).",
               Query(per_job(M.EVAL_METRIC, "metric"), legend=f"{LEGEND} {{{{metric}}}}")),
            ts("Learning rate", "Learning rate of the last step.", Query(per_job(M.LEARNING_RATE)),
               unit="sci"),
            ts("Step progress", "Optimizer steps completed over time.", Query(per_job(M.STEP)),
               width=12),
            ts("Gradient norm", "Global gradient L2 norm before clipping.", Query(per_job(M.GRAD_NORM)),
               width=12),
        )),
        ("Throughput", (
            ts("Samples/s", "Training samples per second, all ranks.", Query(per_job(M.SAMPLES_PER_SECOND))),
            ts("Real tokens/s", "Non-pad training tokens per second, all ranks (the gauge: last logging window; "
               "rate: over the interval).",
               Query(per_job(M.TOKENS_PER_SECOND)),
               Query(f"sum by ({BY_JOB}) (rate({total(M.TOKENS)}{SEL}[{RATE}]))",
                     legend=f"{LEGEND} (rate)")),
            ts("Padding", "Pad tokens / tokens fed to the model: the cost of batching.",
               Query(per_job(M.PADDING_RATIO)), unit="percentunit", options={"min": 0, "max": 1}),
            ts("Model FLOP/s", "Training FLOP/s of the model: FLOPs per real token (6N, about 4N with LoRA, "
               "N = matmul parameters) x real tokens/s.", Query(per_job(M.MODEL_FLOPS)),
               unit="flops", width=12),
            ts("MFU", "Model FLOPs utilisation against the device's dense bf16 peak x world size; only where the "
               "GPU's peak is known (A100, H100, H200) or set with KUBETRAIN_PEAK_TFLOPS.",
               Query(per_job(M.MFU, "device"), legend=f"{LEGEND} {{{{device}}}}"),
               unit="percentunit", width=12, options={"min": 0}),
        )),
        ("Goodput", (
            st("Goodput", "Productive training time / wall time since the job first started (over restarts).",
               Query(per_job(M.GOODPUT)), unit="percentunit", width=6, height=8,
               options={"min": 0, "max": 1}),
            ts("Goodput over time", "Productive training time / wall time since the job first started.",
               Query(per_job(M.GOODPUT)), unit="percentunit", width=18,
               options={"min": 0, "max": 1}),
        )),
        ("Checkpoints", (
            st("Age of last checkpoint", "Time since the newest complete checkpoint landed (this attempt).",
               Query(checkpoint_age()),
               unit="s", width=6),
            st("Last checkpoint step", "Step of the newest complete checkpoint.",
               Query(per_job(M.LAST_CHECKPOINT_STEP)), width=6),
            st("Checkpoint size", "Size of the newest complete checkpoint.",
               Query(per_job(M.CHECKPOINT_BYTES)), unit="bytes", width=6),
            st("Checkpoint failures", "Checkpoint saves that failed after retries, over the interval.",
               Query(f"sum by ({BY_JOB}) (increase({total(M.CHECKPOINT_FAILURES)}{SEL}[$__range]))"),
               width=6),
            ts("Checkpoint duration", "The newest complete checkpoint's time by phase: stall (training blocked "
               "while the state is written locally) and upload (in the background). A step up is a slower "
               "checkpoint; flat means none since. Percentiles over long windows: "
               f"histogram_quantile over {M.CHECKPOINT_DURATION}_bucket.",
               Query(f"max by ({BY_JOB}, phase) ({M.LAST_CHECKPOINT_DURATION}{SEL})",
                     legend=f"{LEGEND} {{{{phase}}}}"),
               unit="s", width=12),
            ts("Checkpoints by reason", "Completed checkpoints per interval: periodic, final, preemption.",
               Query(f"sum by ({BY_JOB}, reason) (increase({total(M.CHECKPOINTS)}{SEL}[{RATE}]))",
                     legend=f"{LEGEND} {{{{reason}}}}"), width=6),
            ts("Checkpoint storage trouble over time", "Per interval: saves that failed after retries, storage "
               "requests retried (storage refusing or down), and snapshots skipped for a newer one (storage slower "
               "than the checkpoint interval).",
               Query(f"sum by ({BY_JOB}) (increase({total(M.CHECKPOINT_FAILURES)}{SEL}[{RATE}]))",
                     legend=f"{LEGEND} failed"),
               Query(f"sum by ({BY_JOB}) (increase({total(M.CHECKPOINT_RETRIES)}{SEL}[{RATE}]))",
                     legend=f"{LEGEND} retried"),
               Query(f"sum by ({BY_JOB}) (increase({total(M.CHECKPOINTS_SUPERSEDED)}{SEL}[{RATE}]))",
                     legend=f"{LEGEND} skipped"), width=6),
        )),
    ),
)

# --------------------------------------------------------------------------------------------- fleet

_ALL = ""  # every job (the fleet dashboard has no job variables)

FLEET = DashboardSpec(
    name="kubetrain-fleet",
    title="kubetrain / Fleet",
    description="The kubetrain operator: TrainingJobs by phase, restarts, preemptions, reconciles; all jobs at a glance.",
    job_variables=False,
    rows=(
        ("Jobs", (
            st("Jobs by phase", "TrainingJobs the operator tracks, by phase.",
               Query(f"sum by (phase) ({O.JOBS})", legend="{{phase}}"), width=12),
            st("Restarts", "Group restarts over the dashboard's time range, by cause.",
               Query(f"sum by (reason) (increase({O.RESTARTS}[$__range]))", legend="{{reason}}"),
               width=6),
            st("Preemptions", "Group restarts caused by a preemption (eviction, node loss, deleted pod), over the range.",
               Query(f"sum(increase({O.PREEMPTIONS}[$__range]))", legend="preemptions"),
               width=6),
            ts("Jobs by phase over time", "TrainingJobs by phase.",
               Query(f"sum by (phase) ({O.JOBS})", legend="{{phase}}"), width=12,
               options={"stack": True}),
            ts("Phase transitions", "Jobs entering each phase, per interval.",
               Query(f"sum by (phase) (increase({O.PHASE_TRANSITIONS}[{RATE}]))",
                     legend="{{phase}}"), width=12),
        )),
        ("Restarts and preemptions", (
            ts("Group restarts by reason", "Group restarts per interval: failure (counts against backoffLimit) or "
               "preemption (does not).",
               Query(f"sum by (reason) (increase({O.RESTARTS}[{RATE}]))", legend="{{reason}}"),
               width=12),
            ts("Preemptions over time", "Preemptions per interval.",
               Query(f"sum(increase({O.PREEMPTIONS}[{RATE}]))", legend="preemptions"), width=12),
        )),
        ("Operator", (
            ts("Reconcile latency", "Time per reconcile (read, plan, apply).",
               Query(f"histogram_quantile(0.5, sum by (le) (rate({O.RECONCILE_DURATION}_bucket[{RATE}])))",
                     legend="p50"),
               Query(f"histogram_quantile(0.99, sum by (le) (rate({O.RECONCILE_DURATION}_bucket[{RATE}])))",
                     legend="p99"),
               unit="s", width=8),
            ts("Reconciles/s", "Reconciles per second (job and pod events, and a recheck every 5 s per job).",
               Query(f"sum(rate({O.RECONCILE_DURATION}_count[{RATE}]))", legend="reconciles/s"),
               unit="reqps", width=8),
            ts("Reconcile errors", "Reconciles that raised, by kind (api: an API error, conflict: status kept changing, internal: a bug); "
               "each is retried.",
               Query(f"sum by (kind) (rate({O.RECONCILE_ERRORS}[{RATE}]))", legend="{{kind}}"),
               unit="reqps", width=8),
        )),
        ("Training jobs", (
            tbl("Training jobs", "Every TrainingJob whose trainer is scraped now.",
                Query(per_job(M.STEP, sel=_ALL), legend="Step"),
                Query(f"{per_job(M.STEP, sel=_ALL)} / {per_job(M.TOTAL_STEPS, sel=_ALL)}",
                      legend="Progress", unit="percentunit"),
                Query(per_job(M.ETA_SECONDS, sel=_ALL), legend="ETA", unit="s"),
                Query(per_job(M.TOKENS_PER_SECOND, sel=_ALL), legend="Real tokens/s"),
                Query(per_job(M.GOODPUT, sel=_ALL), legend="Goodput", unit="percentunit"),
                Query(checkpoint_age(_ALL), legend="Last checkpoint age", unit="s"),
                height=10),
        )),
    ),
)

DASHBOARDS: tuple[DashboardSpec, ...] = (TRAINING, FLEET)


def dashboard_json(spec: DashboardSpec) -> str:
    return JSONEncoder(sort_keys=True, indent=2).encode(build(spec)) + "\n"


def panel_queries(doc: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of a dashboard JSON document, rows included."""
    out = []
    for panel in doc.get("panels", []):
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                out.append((inner.get("title", ""), target["expr"]))
    return out
