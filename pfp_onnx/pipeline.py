"""compress() and analyze(): load → analyse → capture → score → allocate → select → rewrite → verify.

The CLI and the Python API both call these; each step is a function of the previous steps' plain data.
prepare() does the budget-independent part once, so a sweep over budgets and methods captures once.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx

from pfp_onnx.allocate import (AUTO_MIN_WIDTH, AUTO_MULTIPLE, ROUND_TO_AUTO, Allocation, GroupDemand, LayerSize,
                               allocate, allocate_uniform, multiple, smallest_budget)
from pfp_onnx.baselines import norm_scores, random_scores
from pfp_onnx.capture import capture_sensitivities
from pfp_onnx.data import (CalibrationData, StreamedData, input_specs, model_feeds, points_in, read_npz, split,
                           validate, whole_batches)
from pfp_onnx.detections import yolo_heads
from pfp_onnx.errors import DataError, ModelError, OptionError
from pfp_onnx.options import ALLOCATIONS, BUDGET_OF, CRITERIA, DEFAULT_RECOVERY, MODES, RECOVERIES
from pfp_onnx.fidelity import check_metric, measure
from pfp_onnx.fidelity import warnings as fidelity_warnings
from pfp_onnx.groups import ChannelAnalysis, analyse_channel_groups
from pfp_onnx.latency import LatencyTable, SpeedTrial, calibrate, compare, measure_table, timing_session
from pfp_onnx.latency.target import TOLERANCE
from pfp_onnx.memory import CAPTURE_SHARE, available_bytes, capture_bytes_per_point, fitting_batch_size
from pfp_onnx.model import check_model, for_analysis, free_graph_weights, load_model, parameter_count, with_metadata
from pfp_onnx.recovery import (FeatureStatistics, new_statistics, recoverable_layers, replacements,
                               sequential_replacements, with_zero_biases)
from pfp_onnx.report import BudgetTrial, CompressReport, GroupRow, LatencyReport, LayerRow, Totals
from pfp_onnx.rewrite import kept_count, rewrite
from pfp_onnx.runtime import ONNXRUNTIME_ERRORS, Device, choose_device
from pfp_onnx.select import Selection, select_channels
from pfp_onnx.verify import ReferenceOutputs, Verification, blame, check_runs, runtime_failure, verify
from pfp_onnx.version import __version__

BUDGET_UNITS = {"weights": "weights", "macs": "MACs", "latency": "latency"}
COUNTED = ("weights", "macs")  # what a budget can count without timing anything
BUDGET_STEP = 0.01  # --min-fidelity: the bisection ends when a failing and a passing budget are this close
SENSITIVITY_DELTA = 1e-16  # δ_S of the reference implementation (docs/method.md §1)

Progress = Callable[[str, int, "int | None"], None]  # (stage, points done, points total if known); 0 at its start
ModelSource = "str | os.PathLike | onnx.ModelProto"
DataSource = "str | os.PathLike | Mapping[str, np.ndarray] | Callable[[], Iterable[Mapping[str, np.ndarray]]]"


@dataclass(frozen=True)
class CompressResult:
    model: onnx.ModelProto
    report: CompressReport
    analysis: ChannelAnalysis
    selections: dict[int, Selection]
    notes: tuple[str, ...] = field(default=())
    replacements: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # recovered weights
    source: onnx.ModelProto | None = None  # the model the analysis describes (with added zero biases)


def load(model: ModelSource) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        check_model(model)
        return for_analysis(model, in_place=False), model.graph.name or "<in-memory model>"
    return for_analysis(load_model(model), in_place=True), str(model)


def load_data(data: DataSource, model: onnx.ModelProto) -> CalibrationData | StreamedData:
    """An .npz path or a dict of arrays (held in memory), or a function returning a fresh iterable of
    batches on every call (streamed: memory bounded by one batch however large the set)."""
    if callable(data):
        return StreamedData(data, model)
    arrays = read_npz(data) if isinstance(data, (str, os.PathLike)) else data
    return validate(arrays, model)


def analyze(model: ModelSource, data: DataSource | None = None) -> ChannelAnalysis:
    """Channel groups of a model; calibration data (optional) makes dynamic sizes concrete."""
    proto, _ = load(model)
    shapes = _run_shapes(load_data(data, proto), proto) if data is not None else None
    return analyse_channel_groups(proto, shapes)


@dataclass(frozen=True)
class Method:
    """How channels are scored, how many each group keeps, and how they are picked."""

    criterion: str = "pfp"  # pfp | l1 | l2 | random
    allocation: str = "pfp"  # pfp | uniform
    mode: str = "deterministic"  # deterministic | randomized | hybrid (PFP sampling)
    recovery: str = DEFAULT_RECOVERY  # none | bias | lstsq | sequential (training-free, after selection)

    def check(self) -> Method:
        for value, allowed, option in ((self.criterion, CRITERIA, "--criterion"),
                                       (self.allocation, ALLOCATIONS, "--allocation"), (self.mode, MODES, "--mode"),
                                       (self.recovery, RECOVERIES, "--recovery")):
            if value not in allowed:
                raise OptionError(f"Unknown {option} '{value}'; use one of {', '.join(allowed)}.")
        return self

    @property
    def label(self) -> str:
        """criterion/allocation[/mode]/recovery, e.g. pfp/pfp/lstsq or l1/uniform/none."""
        mode = [] if self.mode == "deterministic" else [self.mode]
        return "/".join([self.criterion, self.allocation, *mode, self.recovery])


@dataclass(frozen=True)
class Prepared:
    """Everything that does not depend on the budget: computed once, pruned at many budgets (sweep)."""

    model: onnx.ModelProto  # what the analysis describes: the original, plus zero biases when recovering
    original: onnx.ModelProto
    name: str
    sensitivity_part: CalibrationData | StreamedData
    holdout_part: CalibrationData | StreamedData | None
    analysis: ChannelAnalysis
    device: Device
    batch_size: int
    sensitivity: dict[int, np.ndarray] | None
    statistics: dict[str, FeatureStatistics]  # consuming layer → input moments, for recovery
    round_to: int | str  # as given: prune() resolves "auto" per sampling mode
    budget_of: str  # weights | macs
    recommended_points: int
    notes: tuple[str, ...]
    seconds: dict[str, float]
    reference: ReferenceOutputs = field(default_factory=ReferenceOutputs)  # the original's held-out outputs
    latency: LatencyTable | None = None  # budget_of="latency": what each layer costs where the model runs
    latency_feed: dict[str, np.ndarray] | None = None  # one batch of the latency table's size, to time on
    detectors: frozenset[str] = frozenset()  # the outputs that are YOLOv8 heads: auto fidelity judges detections


def prepare(model: ModelSource, data: DataSource, *, budgets: Sequence[float], methods: Sequence[Method],
            holdout: float = 0.2, batch_size: int = 32, seed: int = 0, device: str = "auto",
            exclude: Sequence[str] = (), exclude_ops: Sequence[str] = (), round_to: int | str = ROUND_TO_AUTO,
            budget_of: str = "weights", progress: Progress | None = None, fidelity: str = "auto",
            fidelity_output: str | None = None, latency_batch: int = 1, latency_threads: int | None = None,
            latency_cache: str | os.PathLike | None = None) -> Prepared:
    """Load, validate, analyse, measure the latency table (budget_of="latency": at `latency_batch` points
    and `latency_threads` threads, cached in `latency_cache`), check the budgets and the fidelity metric, then
    capture sensitivities if any method needs them."""
    started = time.perf_counter()
    methods = [method.check() for method in methods]
    if batch_size < 1:
        raise OptionError(f"--batch-size must be at least 1; got {batch_size}.")
    round_to = check_round_to(round_to)
    if budget_of not in BUDGET_OF:
        raise OptionError(f"--budget-of takes {' or '.join(BUDGET_OF)}; got '{budget_of}'.")
    if round_to not in (1, ROUND_TO_AUTO) and any(method.mode != "deterministic" for method in methods):
        raise OptionError(f"--round-to {round_to} needs --mode deterministic: sampling keeps a random number of "
                          "channels. Leave --round-to at auto (it rounds only deterministic selections) or pass 1.")
    proto, name = load(model)
    check_metric(fidelity, fidelity_output, [output.name for output in proto.graph.output])
    original = proto
    calibration = load_data(data, proto)
    sensitivity_part, holdout_part = split(calibration, holdout, seed)
    fixed = _fixed_batch(proto)
    (sensitivity_part, left_out), (holdout_part, held_left_out) = (whole_batches(part, fixed)
                                                                    for part in (sensitivity_part, holdout_part))
    if sensitivity_part.count == 0:
        raise DataError(f"{name} runs batches of exactly {fixed} points (its input's batch dimension), and fewer "
                        f"than {fixed} points are left for sensitivity. Give more points or lower --holdout.")
    if holdout_part is not None and holdout_part.count == 0:
        holdout_part = None
    excluded = dict(exclude_nodes=exclude, exclude_ops=exclude_ops)
    analysis = analyse_channel_groups(proto, _run_shapes(calibration, proto), **excluded)
    recovery = max((method.recovery for method in methods), key=RECOVERIES.index, default="none")
    if recovery != "none":  # give every layer that may be corrected a bias to absorb the correction
        proto = with_zero_biases(proto, {layer.node for layer in recoverable_layers(analysis)})
        analysis = analyse_channel_groups(proto, _run_shapes(calibration, proto), **excluded)
    free_graph_weights(proto)  # the analysis graph's weight arrays
    if not analysis.layers:
        raise ModelError(f"{name} has no Conv, Gemm or MatMul layer with constant weights: nothing to prune.")
    if not analysis.prunable_groups:
        reasons = "; ".join(sorted({group.frozen[0] for group in analysis.groups}))[:400]
        raise ModelError(f"No channel group of {name} can be pruned safely ({reasons or 'no groups'}). "
                         "Run `pfp-onnx analyze` to see why each group is frozen.")
    layer_sizes = _layer_sizes(analysis, budget_of, name)
    chosen_device = choose_device(device)
    notes = [chosen_device.note]
    latency = latency_feed = None
    seconds = {"analyse": time.perf_counter() - started}
    if budget_of == "latency":
        stage_start = time.perf_counter()
        latency, latency_feed = _latency_table(proto, analysis, layer_sizes, chosen_device, sensitivity_part,
                                               fixed, latency_batch, latency_threads, latency_cache, progress, name)
        notes += list(latency.notes)
        seconds["latency"] = time.perf_counter() - stage_start
    cost, auto_step = _latency_cost(latency, layer_sizes)
    for budget in budgets:  # fail on an impossible budget before the expensive capture
        for step in {effective_round_to(round_to, _selection_mode(method)) for method in methods}:
            allocate(_unscored_demands(analysis), layer_sizes, budget, round_to=step, unit=BUDGET_UNITS[budget_of],
                     cost=cost, auto_step=auto_step)
    recommended = _recommended_points(analysis)
    needs_sensitivity = any("pfp" in (method.criterion, method.allocation) for method in methods)
    statistics = new_statistics(analysis, recovery) if recovery != "none" else {}
    batch_size = fixed or batch_size
    if needs_sensitivity or statistics:
        batch_size, note = _capture_batch_size(analysis, proto, batch_size, fixed=fixed is not None)
        notes += [note] if note else []
    if left_out + held_left_out:
        notes.append(f"{name} runs batches of exactly {fixed} points: {left_out + held_left_out} calibration "
                     f"point(s) that do not fill a batch were left out"
                     + ("" if holdout_part is not None or not holdout else ", and so was verification"))
    sensitivity = None
    if needs_sensitivity or statistics:
        stage_start = time.perf_counter()
        try:
            advance = _stage_progress(progress, "capture", sensitivity_part.count)
            sensitivity = capture_sensitivities(
                proto, analysis, _counted(sensitivity_part.batches(batch_size), advance), chosen_device,
                sensitivity=needs_sensitivity, statistics=statistics)
        except ONNXRUNTIME_ERRORS as exc:
            raise blame(exc, original, name, sensitivity_part.batches(batch_size), chosen_device) from exc
        seconds["capture"] = time.perf_counter() - stage_start
    if needs_sensitivity and (sensitivity_part.count or 0) < recommended:
        notes.append(f"{sensitivity_part.count} points were used for sensitivity; PFP's bound asks for about "
                     f"{recommended} (more points make the sensitivities more reliable)")
    return Prepared(proto, original, name, sensitivity_part, holdout_part, analysis, chosen_device, batch_size,
                    sensitivity, statistics, round_to, budget_of, recommended, tuple(notes), seconds,
                    latency=latency, latency_feed=latency_feed, detectors=yolo_heads(original))


def _latency_table(model: onnx.ModelProto, analysis: ChannelAnalysis, layer_sizes: Sequence[LayerSize],
                   device: Device, points: CalibrationData | StreamedData, fixed: int | None, batch: int,
                   threads: int | None, cache: str | os.PathLike | None, progress: Progress | None,
                   name: str) -> tuple[LatencyTable, dict[str, np.ndarray]]:
    """The latency table at the deployment's batch (a model exported with a fixed batch runs that one), and
    the batch of calibration points it was timed on."""
    if batch < 1 or (threads is not None and threads < 1):
        raise OptionError(f"--latency-batch and --latency-threads take whole numbers of at least 1; got "
                          f"{batch} and {threads}.")
    batch = fixed or batch
    feed = _latency_feed(points, batch)
    if progress is not None:
        progress("latency", 0, None)
    try:
        table = measure_table(model, analysis, layer_sizes, device, feed=feed, batch=batch, fixed_batch=bool(fixed),
                              threads=threads, cache=cache,
                              progress=None if progress is None else lambda done, total: progress("latency", done,
                                                                                                  total))
    except ValueError as exc:
        raise OptionError(f"--budget-of latency times every prunable layer at its real size, and {name} leaves "
                          f"it open: {exc}. Use --budget-of weights, or export the model with static spatial "
                          "sizes.") from None
    except ONNXRUNTIME_ERRORS as exc:
        raise blame(exc, model, name, iter([feed]), device) from exc
    return table, feed


def _latency_feed(points: CalibrationData | StreamedData, batch: int) -> dict[str, np.ndarray]:
    """`batch` calibration points (repeated when there are fewer): what deployment feeds, not noise, so that
    data-dependent operators (a detector's NMS) take their usual time."""
    first = model_feeds(next(points.batches(batch)))
    return {key: np.resize(values, (batch, *values.shape[1:])) if values.shape[0] != batch else values
            for key, values in first.items()}


def _latency_cost(latency: LatencyTable | None, layer_sizes: Sequence[LayerSize]):
    """The allocation's cost function and the width step "auto" rounds to: the latency table's prediction and
    its measured staircase, or the weight count and 8."""
    if latency is None:
        return None, AUTO_MULTIPLE
    return latency.predictor(layer_sizes), latency.step


def prune(prepared: Prepared, *, budget: float, method: Method = Method(), seed: int = 0,
          progress: Progress | None = None, fidelity: str = "auto", fidelity_output: str | None = None,
          min_fidelity: float | None = None) -> CompressResult:
    """Allocate, select, rewrite and verify one pruned model from prepared data; its fidelity is measured by
    `fidelity` on `fidelity_output` (pfp_onnx.fidelity) against `min_fidelity` when given."""
    started = time.perf_counter()
    analysis, proto = prepared.analysis, prepared.model
    rng = np.random.default_rng(seed)
    scores = _scores(prepared, method.criterion, rng)
    layer_sizes = _layer_sizes(analysis, prepared.budget_of, prepared.name)
    mode = _selection_mode(method)
    round_to = effective_round_to(prepared.round_to, mode)
    unit = BUDGET_UNITS[prepared.budget_of]
    cost, auto_step = _latency_cost(prepared.latency, layer_sizes)

    # What the allocation may count under a latency budget: the latency table's prediction, or the MACs
    # (where every output size is known); each is landed on the measured speed-up (_meet_speedup).
    proxies = {"latency": (layer_sizes, cost)}
    if prepared.latency is not None and all(layer.positions is not None for layer in analysis.layers):
        proxies["macs"] = (_layer_sizes(analysis, "macs"), None)

    def choose(share: float, generator: np.random.Generator, proxy: str = "latency"):
        sizes, counted = proxies[proxy]
        if method.allocation == "pfp":
            chosen = allocate(_demands(analysis, prepared.sensitivity), sizes, share, round_to=round_to,
                              unit=unit, cost=counted, auto_step=auto_step)
        else:
            chosen = allocate_uniform(_demands(analysis, scores), sizes, share, round_to=round_to, unit=unit,
                                      cost=counted, auto_step=auto_step)
        return chosen, {group.id: select_channels(scores[group.id], chosen.kept[str(group.id)], mode, generator)
                        for group in analysis.prunable_groups}

    def chosen_afresh(share: float, proxy: str):  # every structure tried or built draws from the same state
        return choose(share, copy.deepcopy(rng), proxy)

    speed_seconds, speed, landed = {}, None, [None]
    if prepared.latency is not None and budget < 1:
        stage_start = time.perf_counter()
        landed, speed = _meet_speedup(prepared, budget, chosen_afresh, list(proxies), cost, progress)
        speed_seconds["speed-up"] = time.perf_counter() - stage_start
        if prepared.holdout_part is None:  # nothing to compare their fidelity on: the smaller ε decides
            landed = landed[:1]
    metadata = {"pfp_onnx.version": __version__, "pfp_onnx.budget": f"{budget:g}", "pfp_onnx.method": method.label,
                "pfp_onnx.mode": mode, "pfp_onnx.seed": str(seed), "pfp_onnx.budget_of": prepared.budget_of}
    builds = [_build(prepared, method, chosen_afresh, budget, trial, round_to, auto_step, metadata, progress)
              for trial in landed]
    preference = [_preference(built.verification, fidelity, fidelity_output, prepared.detectors) for built in builds]
    chosen = max(range(len(builds)),  # the first (smaller ε) on a tie
                 key=lambda index: (preference[index][0], preference[index][1] or 0.0, preference[index][2]))
    built, chosen_trial = builds[chosen], landed[chosen]
    compared = (tuple((trial.cost, value, detected, -error) for trial, (value, detected, error)
                      in zip(landed, preference)) if len(builds) > 1 else ())
    allocation, selections, pruned, verification = built.allocation, built.selections, built.model, built.verification
    seconds = dict(prepared.seconds, **speed_seconds)
    for stage in ("refit", "verify"):
        if any(stage in item.seconds for item in builds):
            seconds[stage] = sum(item.seconds.get(stage, 0.0) for item in builds)
    seconds["rewrite"] = (time.perf_counter() - started - sum(speed_seconds.values())
                          - seconds.get("refit", 0.0) - seconds.get("verify", 0.0))
    epsilon = None if math.isnan(allocation.epsilon) else allocation.epsilon
    seconds["total"] = sum(seconds.values())
    measured = alerts = None
    if verification is not None:
        measured = measure(verification, fidelity, fidelity_output, min_fidelity, prepared.detectors)
        alerts = fidelity_warnings(verification, measured)
    # after the fall-back, rounding cannot help: the odd-width hint would point to it in vain
    notes = (prepared.notes + (built.rounding_notes or _width_notes(analysis, selections, built.round_to, mode))
             + built.refit_notes)
    report = CompressReport(
        model=prepared.name, budget=budget, budget_of=prepared.budget_of, method=method.label, mode=mode, seed=seed,
        round_to=str(built.round_to),
        epsilon=epsilon,
        device=prepared.device.name, sensitivity_points=prepared.sensitivity_part.count,
        recommended_sensitivity_points=prepared.recommended_points,
        groups=_group_rows(analysis, scores, selections),
        totals=_totals(prepared.original, pruned, analysis, selections),
        verification=verification, seconds={k: round(v, 3) for k, v in seconds.items()}, notes=notes,
        fidelity=measured, warnings=alerts or (),
        latency=_latency_report(prepared, budget, chosen_trial, speed, compared),
        layers=_layer_rows(analysis, selections, prepared.latency, layer_sizes))
    return CompressResult(pruned, report, analysis, selections, notes, built.changes or {}, proto)


def _preference(verification: Verification | None, metric: str, output: str | None, detectors: frozenset[str]
                ) -> tuple[float, float | None, float]:
    """How two structures on target rank: the held-out fidelity, then (a YOLOv8-style judged output) the F1 of
    its detections, then the smaller mean relative output error. A detector's channel error often clips to
    0 for both, and its detections still tell them apart."""
    if verification is None:
        return 0.0, None, 0.0
    judged = output or verification.outputs[0].name
    matches = verification.detections.get(judged)
    return (measure(verification, metric, output, detectors=detectors).value, None if matches is None else matches.f1,
            -verification.mean_relative_error)


@dataclass(frozen=True)
class _Built:
    """One pruned model of prune(): its allocation, selections, recovered weights and verification."""

    allocation: Allocation
    selections: dict[int, Selection]
    round_to: int | str
    rounding_notes: tuple[str, ...]
    changes: dict | None
    refit_notes: tuple[str, ...]
    model: onnx.ModelProto
    verification: Verification | None
    seconds: dict[str, float]


def _build(prepared: Prepared, method: Method, choose, budget: float, landed: SpeedTrial | None,
           round_to: int | str, auto_step: int, metadata: dict[str, str], progress: Progress | None) -> _Built:
    """Allocate at `budget` (or where the latency loop `landed`), select, recover, rewrite, and verify on the
    held-out points."""
    analysis, proto = prepared.analysis, prepared.model
    allocation, selections = (choose(budget, "latency") if landed is None else choose(landed.budget, landed.cost))
    rounding_notes = ()
    if allocation.round_to != round_to:
        rounding_notes = (f"budget {budget:g} is below what widths rounded to multiples of {auto_step} can meet, "
                          f"so they were left unrounded (as with --round-to 1); the pruned model may run slower "
                          f"than its MAC count suggests",)
        round_to = allocation.round_to
    changes = None
    if method.recovery != "none":
        changes = replacements(proto, analysis, selections, prepared.statistics, method.recovery)
    seconds, refit_notes = {}, []
    if method.recovery in ("sequential", "sequential-ls"):
        stage_start = time.perf_counter()
        changes = _sequential(prepared, selections, changes, progress, refit_notes,
                              match_outputs=method.recovery == "sequential")
        seconds["refit"] = time.perf_counter() - stage_start
    pruned = with_metadata(rewrite(proto, analysis, selections, changes),
                           dict(metadata, **{"pfp_onnx.round_to": str(round_to)}))
    verification = None
    if prepared.holdout_part is None:  # otherwise verification runs it, and blames a failure the same way
        check_runs(pruned, next(prepared.sensitivity_part.batches(_fixed_batch(proto) or 1)), prepared.device,
                   original=prepared.original, name=prepared.name)
    else:
        stage_start = time.perf_counter()
        holdout_batches = prepared.holdout_part.batches
        epsilon = None if math.isnan(allocation.epsilon) else allocation.epsilon
        try:
            advance = _stage_progress(progress, "verify", prepared.holdout_part.count)
            verification = verify(proto, pruned, _counted(holdout_batches(prepared.batch_size), advance),
                                  prepared.device, epsilon=epsilon, reference=prepared.reference)
        except ONNXRUNTIME_ERRORS as exc:
            raise blame(exc, prepared.original, prepared.name, holdout_batches(prepared.batch_size),
                        prepared.device) from exc
        seconds["verify"] = time.perf_counter() - stage_start
    return _Built(allocation, selections, round_to, rounding_notes, changes, tuple(refit_notes), pruned,
                  verification, seconds)


def _meet_speedup(prepared: Prepared, budget: float, choose, proxies: Sequence[str], predict,
                  progress: Progress | None) -> tuple[list[SpeedTrial], tuple[SpeedTrial, ...]]:
    """The structures that measure 1/budget times as fast as the original, smaller PFP error bound ε first,
    and every structure timed.

    Each proxy the allocation can count (the latency table's prediction; the MACs) is landed on the target
    by pfp_onnx.latency.target; those within its tolerance (else the closest) are returned. prune() keeps
    the one with the better held-out fidelity: neither cost nor ε ranks them reliably (on a MobileNetV3 the
    MACs' allocation had the smaller ε and kept 84.2% top-1 at 1.5× against the table's 59.2%, on others
    the table's lands with less pruning)."""
    table, device = prepared.latency, prepared.device
    original = timing_session(prepared.original, device, table.threads)
    done = [0]

    def trial(share: float, proxy: str) -> SpeedTrial:
        allocation, selections = choose(share, proxy)
        candidate = timing_session(rewrite(prepared.model, prepared.analysis, selections, None), device, table.threads)
        original_ms, pruned_ms = compare(original, candidate, prepared.latency_feed)
        done[0] += 1
        if progress is not None:
            progress("speed-up", done[0], None)
        epsilon = None if math.isnan(allocation.epsilon) else allocation.epsilon
        return SpeedTrial(budget=share, predicted=table.model_ms / predict(allocation.kept),
                          measured=original_ms / pruned_ms, original_ms=original_ms, pruned_ms=pruned_ms, cost=proxy,
                          epsilon=epsilon)

    if progress is not None:
        progress("speed-up", 0, None)
    landed, trials = [], []
    for proxy in proxies:
        whole, _ = choose(1.0, proxy)
        best, tried = calibrate(1 / budget, lambda share: trial(share, proxy),
                                floor=whole.weights_floor / whole.weights_total)
        landed.append(best)
        trials += tried
    on_target = [item for item in landed if abs(item.measured * budget - 1) <= TOLERANCE]
    pool = on_target or [min(landed, key=lambda item: abs(math.log(item.measured * budget)))]
    return sorted(pool, key=lambda item: math.inf if item.epsilon is None else item.epsilon), tuple(trials)


def _latency_report(prepared: Prepared, budget: float, chosen: SpeedTrial | None,
                    trials: tuple[SpeedTrial, ...] | None,
                    compared: tuple[tuple[str, float, float | None, float], ...]
                    ) -> LatencyReport | None:
    table = prepared.latency
    if table is None:
        return None
    return LatencyReport(
        provider=table.provider, batch=table.batch, threads=table.threads, target_speedup=1 / budget,
        predicted_speedup=chosen.predicted if chosen else 1.0, measured_speedup=chosen.measured if chosen else 1.0,
        original_ms=chosen.original_ms if chosen else table.model_ms, pruned_ms=chosen.pruned_ms if chosen else
        table.model_ms, step=table.step, table_seconds=table.seconds, table_cached=table.cached,
        table_path=table.path, trials=tuple(trials or ()), allocation_cost=chosen.cost if chosen else "latency",
        compared=compared)


def _layer_rows(analysis: ChannelAnalysis, selections: Mapping[int, Selection], table: LatencyTable | None,
                layer_sizes: Sequence[LayerSize]) -> tuple[LayerRow, ...]:
    """Per layer in graph order, the units kept on each side, and its latency alone before and after where a
    latency table timed it: the picture of where the budget went."""
    sizes = {size.name: size for size in layer_sizes}
    rows = []
    for layer in analysis.layers:
        kept_in = layer.in_units - sum(analysis.group(g).width - kept_count(analysis, selections, g)
                                       for g in layer.in_groups)
        kept_out = layer.out_units - sum(analysis.group(g).width - kept_count(analysis, selections, g)
                                         for g in layer.out_groups)
        curve = table.curves.get(layer.node) if table is not None and layer.node in sizes else None
        rows.append(LayerRow(node=layer.node, op=layer.op, in_units=layer.in_units, in_kept=kept_in,
                             out_units=layer.out_units, out_kept=kept_out,
                             ms_before=None if curve is None else round(curve.full_ms, 4),
                             ms_after=None if curve is None else round(curve.ms(kept_in, kept_out), 4)))
    return tuple(rows)


def _sequential(prepared: Prepared, selections: Mapping[int, Selection], changes: dict,
                progress: Progress | None, notes: list[str], *, match_outputs: bool) -> dict:
    """Re-fit the one-pass weights on the pruned model's own activations (pfp_onnx.recovery.sequential), its
    passes reported as one stage, in the memory this machine has (what it cannot afford goes in `notes`)."""
    points = prepared.sensitivity_part

    def on_start(passes: int):
        return _stage_progress(progress, "refit", None if points.count is None else points.count * passes)

    available = available_bytes()
    try:
        return sequential_replacements(prepared.model, prepared.original, prepared.analysis, selections, changes,
                                       lambda: points.batches(prepared.batch_size), prepared.device,
                                       on_start=on_start, notes=notes, points=points.count,
                                       memory_limit=None if available is None else int(CAPTURE_SHARE * available),
                                       match_outputs=match_outputs)
    except ONNXRUNTIME_ERRORS as exc:
        raise blame(exc, prepared.original, prepared.name, points.batches(prepared.batch_size),
                    prepared.device) from exc


def compress(model: ModelSource, data: DataSource, *, budget: float | None = None, mode: str = "deterministic",
             criterion: str = "pfp", allocation: str = "pfp", recovery: str = DEFAULT_RECOVERY, holdout: float = 0.2,
             batch_size: int = 32, seed: int = 0, device: str = "auto", exclude: Sequence[str] = (),
             exclude_ops: Sequence[str] = (), round_to: int | str = ROUND_TO_AUTO, budget_of: str = "weights",
             min_fidelity: float | None = None, fidelity: str = "auto",
             fidelity_output: str | None = None, progress: Progress | None = None,
             target_speedup: float | None = None, latency_batch: int = 1, latency_threads: int | None = None,
             latency_cache: str | os.PathLike | None = None) -> CompressResult:
    """Prune `model` to keep `budget` of its prunable-layer weights (budget_of="macs": of their
    multiply-accumulates per point; "latency": of its latency measured with onnxruntime at `latency_batch`
    points and `latency_threads` threads, the table cached in `latency_cache`), guided by PFP sensitivities.
    `target_speedup` S is budget_of="latency" with budget 1/S.

    `model` is a path or a ModelProto; `data` an .npz path or a dict of arrays keyed by input name (plus
    optional `labels`). criterion/allocation select the baselines instead of PFP. round_to="auto" keeps
    pruned widths multiples of 8 where that makes them fast (pfp_onnx.allocate.multiple); 1 keeps PFP's
    exact counts. `min_fidelity` without a budget finds the smallest budget whose held-out fidelity
    (pfp_onnx.fidelity: `fidelity` on `fidelity_output`) meets it, by bisection on one capture; with a budget
    it is only measured against (report.fidelity.met), and the CLI refuses to write a model that misses it.
    """
    method = Method(criterion, allocation, mode, recovery).check()
    budget, budget_of = _speedup_budget(target_speedup, budget, budget_of)
    if budget is None and min_fidelity is None:
        raise OptionError("Give --budget (the share of weights or MACs to keep), --min-fidelity (the held-out "
                          "fidelity to keep; pfp-onnx finds the smallest budget that does), or both.")
    if min_fidelity is not None and not 0 < min_fidelity <= 1:
        raise OptionError(f"--min-fidelity takes a fidelity in (0, 1], e.g. 0.99; got {min_fidelity}.")
    if min_fidelity is not None and not 0 < holdout < 1:
        raise OptionError("--min-fidelity is measured on held-out points: give --holdout between 0 and 1 "
                          "(e.g. 0.2).")
    prepared = prepare(model, data, budgets=[] if budget is None else [budget], methods=[method], holdout=holdout,
                       batch_size=batch_size, seed=seed, device=device, exclude=exclude, exclude_ops=exclude_ops,
                       round_to=round_to, budget_of=budget_of, progress=progress, fidelity=fidelity,
                       fidelity_output=fidelity_output, latency_batch=latency_batch, latency_threads=latency_threads,
                       latency_cache=latency_cache)
    if min_fidelity is not None and prepared.holdout_part is None:
        raise DataError(f"No held-out points are left to measure fidelity on ({prepared.name} needs whole batches); "
                        "give more calibration points.")
    judged = dict(fidelity=fidelity, fidelity_output=fidelity_output, min_fidelity=min_fidelity)
    if budget is not None:
        return prune(prepared, budget=budget, method=method, seed=seed, progress=progress, **judged)
    return _smallest_meeting(prepared, method, seed, progress, judged)


def _speedup_budget(target_speedup: float | None, budget: float | None, budget_of: str
                    ) -> tuple[float | None, str]:
    """--target-speedup S is --budget-of latency --budget 1/S; it cannot be given with another budget."""
    if target_speedup is None:
        return budget, budget_of
    if budget is not None or budget_of not in ("weights", "latency"):
        raise OptionError("--target-speedup sets the budget itself (a latency budget of 1/speed-up): leave out "
                          "--budget and --budget-of.")
    if not target_speedup > 1:
        raise OptionError(f"--target-speedup takes a speed-up above 1, e.g. 1.5; got {target_speedup}.")
    return 1 / target_speedup, "latency"


def _smallest_meeting(prepared: Prepared, method: Method, seed: int, progress: Progress | None,
                      judged: dict) -> CompressResult:
    """Bisect the budgets that are multiples of BUDGET_STEP, from the smallest feasible one to 1 (nothing
    pruned), until a failing and a passing one are one step apart; return the passing one's model, every
    trial in its report."""
    started = time.perf_counter()
    steps = round(1 / BUDGET_STEP)
    floor = _smallest_budget(prepared) or BUDGET_STEP
    low, high = math.ceil(floor * steps - 1e-9) - 1, steps  # low: known to fail (or infeasible); high: passes
    best, trials = None, []
    while high - low > 1:
        middle = (low + high) // 2
        result = prune(prepared, budget=middle / steps, method=method, seed=seed, progress=progress, **judged)
        trials.append(BudgetTrial(middle / steps, result.report.fidelity.value, bool(result.report.fidelity.met)))
        if result.report.fidelity.met:
            high, best = middle, result
        else:
            low = middle
    if best is None:
        best = prune(prepared, budget=1.0, method=method, seed=seed, progress=progress, **judged)
        trials.append(BudgetTrial(1.0, best.report.fidelity.value, bool(best.report.fidelity.met)))
    high = high / steps
    chosen = (f"budget {high:g} chosen: the smallest meeting fidelity {judged['min_fidelity']:g} within "
              f"{BUDGET_STEP:g} ({len(trials)} budgets tried)")
    if high == 1.0:
        chosen = f"no budget below 1 met fidelity {judged['min_fidelity']:g}: nothing was pruned"
    seconds = {stage: value for stage, value in best.report.seconds.items() if stage in prepared.seconds}
    seconds["search"] = round(time.perf_counter() - started, 3)  # every budget tried, the chosen one's among them
    seconds["total"] = round(sum(seconds.values()), 3)
    report = replace(best.report, search=tuple(trials), notes=best.report.notes + (chosen,), seconds=seconds)
    return replace(best, report=report, notes=report.notes)


def _smallest_budget(prepared: Prepared) -> float | None:
    """The floor of prepared's budget: for latency, the latency table's prediction with every prunable group
    down to one channel."""
    if prepared.latency is None:
        return smallest_budgets(prepared.analysis)[prepared.budget_of]
    layer_sizes = _layer_sizes(prepared.analysis, prepared.budget_of, prepared.name)
    whole = allocate(_unscored_demands(prepared.analysis), layer_sizes, 1.0,
                     cost=prepared.latency.predictor(layer_sizes))
    return smallest_budget(whole.weights_floor, whole.weights_total)


def smallest_budgets(analysis: ChannelAnalysis) -> dict[str, float | None]:
    """Per --budget-of, the smallest budget compress accepts (every prunable group keeping one channel,
    exact counts), rounded up to 0.001 as the BudgetError says it; None for MACs while some layer's output
    size is open (analyse with calibration data), and for both when nothing can be pruned."""
    if not analysis.prunable_groups:
        return dict.fromkeys(COUNTED)
    floors: dict[str, float | None] = {}
    for budget_of in COUNTED:
        try:
            whole = allocate(_unscored_demands(analysis), _layer_sizes(analysis, budget_of), 1.0)
        except OptionError:
            floors[budget_of] = None
            continue
        floors[budget_of] = smallest_budget(whole.weights_floor, whole.weights_total)
    return floors


def check_round_to(round_to: int | str) -> int | str:
    """"auto", or a whole number of at least 1 (an int, or its text as the CLI passes it)."""
    if isinstance(round_to, str) and round_to.strip().lower() == ROUND_TO_AUTO:
        return ROUND_TO_AUTO
    try:
        value = int(round_to.strip() if isinstance(round_to, str) else round_to)
    except (TypeError, ValueError):
        value = 0
    if isinstance(round_to, (bool, float)) or value < 1:
        raise OptionError(f"--round-to takes 'auto' or a whole number of at least 1 (e.g. 8); got '{round_to}'.")
    return value


def effective_round_to(round_to: int | str, mode: str) -> int | str:
    """Sampling keeps a random number of channels, so "auto" rounds only deterministic selections."""
    return 1 if round_to == ROUND_TO_AUTO and mode != "deterministic" else round_to


def _selection_mode(method: Method) -> str:
    """Only PFP sensitivities are sampled from; the baselines always keep their top channels."""
    return method.mode if method.criterion == "pfp" else "deterministic"


def _scores(prepared: Prepared, criterion: str, rng: np.random.Generator) -> dict[int, np.ndarray]:
    if criterion == "pfp":
        return prepared.sensitivity
    if criterion == "random":
        return random_scores(prepared.analysis, rng)
    return norm_scores(prepared.model, prepared.analysis, 1 if criterion == "l1" else 2)


def _run_shapes(calibration: CalibrationData | StreamedData, model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Input shapes for the analysis: one point, or one fixed batch where the model was exported with one
    (its Reshapes and outputs may spell that batch out; the analysis divides rows by it)."""
    fixed = _fixed_batch(model)
    return {name: (fixed or 1, *shape[1:]) for name, shape in calibration.point_shapes().items()}


def _capture_batch_size(analysis: ChannelAnalysis, model: onnx.ModelProto, batch_size: int, *,
                        fixed: bool) -> tuple[int, str | None]:
    """The batch size capture can afford in the memory left (pfp_onnx.memory), and a note when that is not
    the one asked for (or, for a model exported with a fixed batch, when its batch may not fit)."""
    per_point = capture_bytes_per_point(analysis, model)
    available = available_bytes()
    fitting = fitting_batch_size(batch_size, per_point, available)
    if fitting >= batch_size:
        return batch_size, None
    needs = (f"a capture batch holds about {_megabytes(per_point)} a point (the input of every layer that reads a "
             f"prunable channel, and the sign parts of its convs), so {batch_size} points would take about "
             f"{_megabytes(per_point * batch_size)}, more than half of the {_megabytes(available)} this machine "
             "has free")
    if fixed:
        return batch_size, f"{needs}, and the model runs batches of exactly {batch_size}: it may run out of memory"
    return fitting, f"{needs}: batches of {fitting} point{'s' if fitting > 1 else ''} are used instead"


def _megabytes(count: int) -> str:
    return f"{count / 2**30:.1f} GB" if count >= 2**30 else f"{max(1, round(count / 2**20))} MB"


def _fixed_batch(model: onnx.ModelProto) -> int | None:
    """A model exported with a fixed batch size can only be fed batches of exactly that size."""
    sizes = {spec.dims[0] for spec in input_specs(model) if spec.dims and spec.dims[0] is not None}
    return sizes.pop() if len(sizes) == 1 else None


def _stage_progress(progress: Progress | None, stage: str, total: int | None):
    """The stage's advance function; the stage is reported at 0 points at once, so that a display can start
    its clock (and show something) before the first batch, which may take a while, is done."""
    if progress is None:
        return None
    done = [0]
    progress(stage, 0, total)

    def advance(points: int) -> None:
        done[0] += points
        progress(stage, done[0], total)

    return advance


def _counted(batches: Iterable[Mapping[str, np.ndarray]], advance: Callable[[int], None] | None):
    """The batches, reporting the points of each once it has been used."""
    for batch in batches:
        yield batch
        if advance is not None:
            advance(points_in(batch))


def _layer_sizes(analysis: ChannelAnalysis, budget_of: str = "weights", name: str = "the model") -> list[LayerSize]:
    """The layers as the allocation counts them: weights, or weights times output positions (MACs)."""
    prunable = {group.id for group in analysis.prunable_groups}
    unknown = [layer.node for layer in analysis.layers if layer.positions is None]
    if budget_of == "macs" and unknown:
        raise OptionError(f"--budget-of macs needs every layer's output size, and {name} leaves it open for "
                          f"{len(unknown)} layer(s) ({', '.join(unknown[:3])}{', …' if len(unknown) > 3 else ''}) "
                          "even with the calibration data's shapes; use --budget-of weights, or export the model "
                          "with static spatial sizes.")

    def side(groups: tuple[int, ...]) -> tuple[tuple[str, int], ...]:
        return tuple((str(g), analysis.group(g).width) for g in groups if g in prunable)

    return [LayerSize(name=layer.node, in_groups=side(layer.in_groups), in_units=layer.in_units,
                      in_block=layer.in_block * layer.kernel, out_groups=side(layer.out_groups),
                      out_units=layer.out_units, positions=layer.positions if budget_of == "macs" else 1)
            for layer in analysis.layers]


def _demands(analysis: ChannelAnalysis, sensitivity: Mapping[int, np.ndarray]) -> list[GroupDemand]:
    """Per group, the consumer whose error bound term ln(8(P+1)K/δ) is largest sets P and K."""
    demands = []
    for group in analysis.prunable_groups:
        consumers = [layer for layer in analysis.layers if group.id in layer.in_groups and layer.sensitivity_probe]
        patches, kernel = max(((layer.positions or 1, layer.kernel * layer.in_block) for layer in consumers),
                              key=lambda pk: (pk[0] + 1) * pk[1])
        demands.append(GroupDemand(name=str(group.id), sensitivity=np.asarray(sensitivity[group.id], np.float64),
                                   patches=patches, kernel=kernel))
    return demands


def _unscored_demands(analysis: ChannelAnalysis) -> list[GroupDemand]:
    """Demands with unit sensitivities: enough to check a budget's feasibility, which depends on sizes only."""
    return _demands(analysis, {group.id: np.ones(group.width, np.float32) for group in analysis.prunable_groups})


def _recommended_points(analysis: ChannelAnalysis) -> int:
    """|S| = ceil(3 ln(8 η* η / δ_S)) with η the output activations of all prunable layers (docs/method.md §1)."""
    counts = [layer.out_units * (layer.positions or 1) for layer in analysis.layers]
    eta, eta_max = sum(counts), max(counts)
    return math.ceil(3 * math.log(8 * eta_max * eta / SENSITIVITY_DELTA))


recommended_points = _recommended_points  # public: how many points `pfp-onnx calib` should gather


def _width_notes(analysis: ChannelAnalysis, selections: Mapping[int, Selection], round_to: int | str,
                 mode: str) -> tuple[str, ...]:
    """A hint when pruned widths that "auto" would round are not multiples of 8: such models can run slower
    than the original (ResNet-18 at budget 0.5 on onnxruntime's CPU provider: 0.78× its speed, 1.22× rounded;
    benchmarks/results/baseline.txt), and nothing else in the output says so."""
    if round_to == ROUND_TO_AUTO or int(round_to) % AUTO_MULTIPLE == 0:
        return ()
    pruned = [(len(selections[group.id].kept), group.width) for group in analysis.prunable_groups
              if group.id in selections and len(selections[group.id].kept) < group.width]
    odd = [kept for kept, width in pruned if kept % multiple(width, ROUND_TO_AUTO)]
    if not odd:
        return ()
    fix = ("--round-to auto (the default)" if mode == "deterministic"
           else "--mode deterministic (with the default --round-to auto)")
    return (f"{len(odd)} of the {len(pruned)} pruned widths are not multiples of {AUTO_MULTIPLE} "
            f"({', '.join(map(str, odd[:4]))}{', …' if len(odd) > 4 else ''}): onnxruntime's CPU kernels and GPU "
            f"tensor cores run such widths slowly, and the pruned model may run slower than the original; {fix} "
            f"keeps every width of a group of {AUTO_MIN_WIDTH} or more channels a multiple of {AUTO_MULTIPLE} "
            f"within the budget",)


def _group_rows(analysis: ChannelAnalysis, sensitivity: Mapping[int, np.ndarray],
                selections: Mapping[int, Selection]) -> tuple[GroupRow, ...]:
    rows = []
    for group in analysis.groups:
        selection = selections.get(group.id)
        kept_share = None
        if selection is not None:
            scores = sensitivity[group.id]
            total = float(scores.sum())
            kept_share = float(scores[selection.kept].sum()) / total if total > 0 else 1.0
        rows.append(GroupRow(group=group.id, producers=group.producers, consumers=group.consumers,
                             channels_before=group.width,
                             channels_after=group.width if selection is None else len(selection.kept),
                             sensitivity_kept=kept_share, frozen=group.frozen, unit=group.unit))
    return tuple(rows)


def _totals(original: onnx.ModelProto, pruned: onnx.ModelProto, analysis: ChannelAnalysis,
            selections: Mapping[int, Selection]) -> Totals:
    def layer_weights(layer, pruned_side: bool) -> int:
        def units(total: int, groups: tuple[int, ...]) -> int:
            if not pruned_side:
                return total
            return total - sum(analysis.group(g).width - kept_count(analysis, selections, g) for g in groups)

        return (units(layer.in_units, layer.in_groups) * layer.in_block * layer.kernel
                * units(layer.out_units, layer.out_groups))

    def macs(pruned_side: bool) -> int | None:  # unknown, not 0, while some layer's output size is open
        if any(layer.positions is None for layer in analysis.layers):
            return None
        return sum(layer_weights(layer, pruned_side) * layer.positions for layer in analysis.layers)

    return Totals(parameters_before=parameter_count(original), parameters_after=parameter_count(pruned),
                  layer_weights_before=analysis.weights_total,
                  layer_weights_after=sum(layer_weights(layer, True) for layer in analysis.layers),
                  macs_before=macs(False), macs_after=macs(True))


def evaluate(original: ModelSource, pruned: ModelSource, data: DataSource, *, batch_size: int = 32,
             device: str = "auto", epsilons: Sequence[float] = (0.01, 0.05, 0.1, 0.2, 0.5)) -> Verification:
    """Compare two models with the same signature on every point of `data` (accuracy when labelled)."""
    reference, reference_name = load(original)
    candidate, candidate_name = load(pruned)
    if input_specs(reference) != input_specs(candidate) or \
            [o.name for o in reference.graph.output] != [o.name for o in candidate.graph.output]:
        raise ModelError(f"{candidate_name} does not have the inputs and outputs of {reference_name}; "
                         "evaluate compares a model with its pruned version.")
    fixed = _fixed_batch(reference)
    calibration, _ = whole_batches(load_data(data, reference), fixed)
    if calibration.count == 0:
        raise DataError(f"{reference_name} runs batches of exactly {fixed} points (its input's batch dimension); "
                        "give at least that many points.")
    chosen_device = choose_device(device)
    size = fixed or batch_size
    try:
        return verify(reference, candidate, calibration.batches(size), chosen_device, epsilons=epsilons)
    except ONNXRUNTIME_ERRORS as exc:  # both models are the user's: say which one onnxruntime cannot run
        failure = (runtime_failure(reference, reference_name, calibration.batches(size), chosen_device)
                   or runtime_failure(candidate, candidate_name, calibration.batches(size), chosen_device))
        if failure is None:
            raise
        raise failure from exc
