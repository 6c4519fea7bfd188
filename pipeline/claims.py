"""Every sentence the report says about what was and was not done, derived from the metrics.

A sentence typed into a template once stops being true the day the code changes (the
first report said "APGD and Square were not run" while both had run). Here each
statement is computed from the validated metrics files; the template only renders
them, and `tests/test_report_claims.py` checks rendered reports against the metrics.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.results import KERNEL_VARIABLES

ATTACK_NAMES = {
    "fgsm": "FGSM", "pgd": "PGD", "pgd_cw": "PGD (CW loss)", "apgd_ce": "APGD-CE", "apgd_dlr": "APGD-DLR",
    "apgd_t": "APGD-T", "fab_t": "FAB-T", "square": "Square",
}
GRADIENT_FREE = ("square",)
TARGETED = ("apgd_t", "fab_t")
METHOD_NAMES = {"ibp": "IBP", "crown_ibp": "CROWN-IBP", "crown": "CROWN", "alpha_crown": "alpha-CROWN"}


def attack_label(name: str) -> str:
    return ATTACK_NAMES.get(name, name)


def listing(items: list[str]) -> str:
    if not items:
        return "none"
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


@dataclass(frozen=True)
class ThreatRow:
    axis: str
    value: str


def threat_model(metrics: dict) -> list[ThreatRow]:
    """The NIST AI 100-2 axes as this evaluation actually exercised them."""
    attack, certify = metrics.get("attack", {}), metrics.get("certify", {})
    threat = attack.get("threat", {})
    names = [a for a in attack.get("attacks", {}) if a not in attack.get("not_run", {})]  # what ran
    gradient = [attack_label(a) for a in names if a not in GRADIENT_FREE]
    black = [attack_label(a) for a in names if a in GRADIENT_FREE]
    knowledge = []
    if gradient:
        knowledge.append(f"white-box: gradients of the evaluated model ({listing(gradient)})")
    if black:
        knowledge.append(f"black-box: model outputs only ({listing(black)})")
    if certify.get("status") == "ok":
        knowledge.append("full model: bound propagation over every input of the ball (certification)")
    targeted = [attack_label(a) for a in names if a in TARGETED]
    goal = "integrity: untargeted misclassification"
    if targeted:
        goal += f"; targeted towards the likeliest wrong classes ({listing(targeted)})"
    norm = {"linf": "L∞", "l2": "L2"}.get(threat.get("norm"), str(threat.get("norm")))
    conditions = conditions_of(metrics)
    described = "; ".join(f"{name}: {record['description']}" for name, record in conditions.items())
    variation = ([ThreatRow("Input variation (triggering conditions)", f"{described} (section 9)")]
                 if conditions else [])
    return [
        ThreatRow("Attack stage", "deployment (evasion at inference time); training-time attacks (poisoning, "
                                  "backdoors) are not evaluated"),
        ThreatRow("Attacker goal", goal),
        ThreatRow("Attacker knowledge", "; ".join(knowledge) or "none: no attack ran"),
        ThreatRow("Attacker capability", f"modify test inputs within the {norm} ball of radius ε = "
                                         f"{threat.get('epsilon', '?')}, inside the data domain; no control of "
                                         "training data, model or code"),
        ThreatRow("Perturbation budget", f"{norm} norm, ε = {threat.get('epsilon', '?')} in input units, on the "
                                         f"{attack.get('split', 'test')} split ({attack.get('n', '?')} samples)"),
    ] + variation


def attack_scope(attack: dict) -> list[str]:
    skipped = attack.get("not_run", {})
    names = [a for a in attack.get("attacks", {}) if a not in skipped]
    ran = listing([attack_label(a) for a in names])
    notes = [f"Robust accuracy is an upper bound: it holds only against the attacks that ran ({ran}, "
             f"{attack.get('mode')} mode). Stronger or adaptive attacks may lower it."]
    notes += attack.get("task_notes", [])
    ref = attack.get("reference_suite")
    if ref:
        ran_ref = [attack_label(a) for a in ref["run"]]
        missing = [attack_label(a) for a in ref["not_run"]]
        sentence = f"Of {ref['reference']} ({listing([attack_label(a) for a in ref['attacks']])}), "
        sentence += f"{listing(ran_ref)} ran" if ran_ref else "none ran"
        sentence += f"; {listing(missing)} did not." if missing else "; every one ran."
        notes.append(sentence)
    masking = attack.get("masking", {})
    if not masking and skipped:
        notes.append(f"Gradient-masking sanity checks did not run: they compare gradient attacks, and "
                     f"{listing([attack_label(a) for a in skipped])} could not run ({next(iter(skipped.values()))}).")
    elif not masking:
        notes.append("Gradient-masking sanity checks (Carlini et al. 2019) were not run: attack.masking.enabled "
                     "is false.")
    for name, check in masking.items():
        if check["status"] == "fail":
            notes.append(f"Gradient-masking check {name} FAILED ({check['detail']}): the robust accuracy may be "
                         "overstated. " + check["meaning"])
        elif check["status"] == "not_run":
            notes.append(f"Gradient-masking check {name} did not run: {check['detail']}.")
    sweep = attack.get("sweep")
    if sweep:
        points = sweep["points"]
        notes.append(f"Robust accuracy was swept over {len(points)} ε values from {points[0]['epsilon']:g} to "
                     f"{points[-1]['epsilon']:g} with {sweep['attack']} only, on the first {sweep['n']} samples.")
    return notes


def certify_scope(certify: dict) -> list[str]:
    if not certify:
        return ["Formal verification did not run: no metrics/certify.json."]
    if certify.get("status") != "ok":
        return [f"Formal verification was not applicable: {certify.get('reason')}."]
    methods = certify.get("methods", {})
    ran = listing([METHOD_NAMES.get(m, m) for m in methods])
    eps = certify["threat"]["epsilon"]
    notes = [f"Verified accuracy is a lower bound from {ran} bound propagation in float32 at ε = {eps:g}; "
             f"margins within {certify['tolerance']:g} of zero are not counted as verified."]
    for method, record in methods.items():
        if record["budget_exhausted"]:
            notes.append(f"{METHOD_NAMES.get(method, method)} certified only {record['accuracy']['n']} of "
                         f"{record['requested']} samples within its time budget.")
    sweep = certify.get("sweep")
    if sweep:
        points = sweep["points"]
        notes.append(f"Verified accuracy was also computed at {len(points)} ε values from {points[0]['epsilon']:g} "
                     f"to {points[-1]['epsilon']:g} ({METHOD_NAMES.get(sweep['method'], sweep['method'])}, first "
                     f"{sweep['n']} samples), each checked against the attack's robust accuracy at the same ε.")
    else:
        notes.append(f"Only ε = {eps:g} was certified: certify.sweep is off, so no verified accuracy against ε "
                     "is claimed.")
    if certify["threat"]["norm"] == "l2":
        notes.append("For L2 certification the data-domain box is not used, which can only loosen the bounds.")
    return notes


def smoothing_scope(smooth: dict) -> list[str]:
    if smooth.get("status") != "ok":
        reason = smooth.get("reason", "no metrics/smooth.json")
        return [f"Randomized smoothing did not run ({reason}): no probabilistic L2 certificate is claimed."]
    notes = [f"Randomized-smoothing certificates hold for the smoothed classifier (which votes over "
             f"{smooth['n_samples_per_input']} noisy copies at inference), not for the ONNX base model, and each "
             f"fails with probability at most α = {smooth['alpha']:g}.",
             f"Limit of this evidence: {smooth['threat_coverage']}."]
    if not smooth.get("base_trained_with_same_sigma"):
        notes.append(f"The smoothing base model was trained with {smooth.get('base_training_method')}, not with "
                     f"Gaussian noise at σ = {smooth['sigma']:g}: its smoothing certificates are sound but weaker "
                     "than a noise-trained model's.")
    return notes


def training_selection(train: dict) -> str:
    """How the kept checkpoint was chosen, as the train stage recorded it."""
    if train.get("source"):  # train imported a supplied file (results.ImportResult)
        kind = {"onnx": "ONNX", "torchscript": "TorchScript", "state_dict": "state_dict (weights)"}[train["source"]]
        return (f"Supplied {kind} file {train['path']} (SHA-256 {train['model_sha256'][:12]}..., "
                f"supplied by {train.get('supplier') or 'an unnamed supplier'}), evaluated as supplied: not trained here.")
    chosen = f"Checkpoint from epoch {train['best_epoch']} of {train['epochs_run']} run: {train['selection_rule']}."
    against = trained_against(train)
    return f"{chosen} {against}" if against else chosen


def trained_against(train: dict) -> str:
    """Which threat training targeted, as the train stage recorded it (nothing for older metrics and for
    standard or noise training, which target none)."""
    threat = train.get("trained_for")
    if not threat:
        return ""
    if threat["name"] == "lp":
        return f"Trained against the {threat['description']} (train.threat: the Lp ball)."
    return (f"Trained against condition {threat['name']!r} ({threat['description']}), not the Lp ball: the Lp "
            f"figures of this report measure a threat the model was not trained for.")


def condition_training_note(name: str, train: dict) -> str:
    """Whether the model was trained for this condition: its figures then are not an unseen-condition test."""
    threat = (train or {}).get("trained_for")
    if not threat or threat["name"] != name:
        return ""
    return (f"The model was trained for this condition ({train['method']} over the same parameter range at "
            "training time), so these figures measure a trained-for condition, not an unforeseen one.")


RUNTIME_STAGES = ("train", "attack", "certify", "smooth", "conditions")


def runtime_used(metrics: dict) -> str:
    """Where each stage computed, from its metrics: the figures are reproducible bit for bit only
    with the same thread count, torch build and processor, so the report names them."""
    groups: dict[tuple, list[str]] = {}
    for stage in RUNTIME_STAGES:
        record = (metrics.get(stage) or {}).get("runtime")
        if record:
            key = (record["device"], record["threads"], record["processes"], record["precision"], record["torch"],
                   record["cpu_capability"], record["cpu"], record.get("gpu"),
                   None if record.get("environment") is None else tuple(sorted(record["environment"].items())))
            groups.setdefault(key, []).append(stage)
    if not groups:
        return "not recorded (metrics from before the runtime record)"
    parts = []
    for (device, threads, processes, precision, torch_version, capability, cpu, gpu, environment), stages \
            in groups.items():
        if environment is None:
            variables = ", thread and kernel variables not recorded"
        elif environment:
            variables = ", with " + ", ".join(f"{name}={value}" for name, value in environment)
        else:
            variables = f", none of {', '.join(KERNEL_VARIABLES)} set"
        parts.append(f"{listing(stages)}: {device}{f' ({gpu})' if gpu else ''}, {processes} "
                     f"process{'es' if processes > 1 else ''} of {threads} thread{'s' if threads > 1 else ''}, "
                     f"{precision}, torch {torch_version}, CPU {cpu}, kernels {capability}"
                     + variables)
    return ("; ".join(parts) + ". Re-running with the same params and seed reproduces these figures bit for bit "
            "only with the same threads, torch build, processor and thread or kernel variables: floating-point "
            "reductions are ordered by them, and another processor may train a different model.")


def supplied_shipping(train: dict) -> str:
    """What ships for a supplied model: an ONNX file itself, else the ONNX export of the torch form."""
    if train["source"] == "onnx":
        return "shipped unchanged"
    return "shipped as the ONNX export of the torch form the evidence is on (export checks the two agree)"


def import_parity(train: dict) -> str:
    """How the torch form every stage evaluated relates to the supplied artifact, from the import record."""
    listed = ", ".join(train["ops"])
    if train.get("not_differentiable"):
        return (f"No torch form exists for this file ({train['not_differentiable']}): every figure comes from "
                f"onnxruntime on the file itself, by forward passes only; ONNX ops: {listed}.")
    if train.get("max_abs_diff") is None:
        kind = "its ONNX export's ops" if train.get("opset") is not None else "its layers"
        return f"The evidence is on the supplied module itself ({train['torch_form']}); {kind}: {listed}."
    reference = "onnxruntime on the file" if train["source"] == "onnx" else "the supplied TorchScript module"
    return (f"Its torch form ({train['torch_form']}) agrees with {reference} to {train['max_abs_diff']:.3g} on "
            f"{train['n']} test inputs; ONNX ops: {listed}.")


def forward_only_scope(metrics: dict) -> list[str]:
    """For a supplied file without a torch form (an op the converter lacks): what forward passes
    allowed on onnxruntime, and what needed gradients or bounds and did not run, from the metrics."""
    reason = metrics.get("train", {}).get("not_differentiable")
    if not reason:
        return []
    attack, certify, smooth = (metrics.get(s, {}) for s in ("attack", "certify", "smooth"))
    did, did_not = [], []
    robust = attack.get("robust_accuracy")
    if robust:
        did.append(f"{listing([attack_label(a) for a in attack['attacks'] if a not in attack.get('not_run', {})])} "
                   f"(robust accuracy at most {robust['value']:.3f}, an upper bound, n = {robust['n']})")
    if smooth.get("status") == "ok":
        did.append("randomized smoothing")
    did_not += [attack_label(a) for a in attack.get("not_run", {})]
    if certify and certify.get("status") != "ok":
        did_not.append("bound propagation (" + listing([METHOD_NAMES.get(m, m) for m in certify.get(
            "requested_methods", [])]) + ")")
    records = [r for r in metrics.get("conditions", {}).values() if isinstance(r, dict) and "robust_accuracy" in r]
    if records:
        order = list(SEARCH_LABELS)
        methods = [m for _, m in sorted({(order.index(c), m) for r in records
                                         for c, m in zip(r["search"]["components"], search_methods(r["search"]))})]
        did.append(f"the search of {len(records)} triggering condition(s) by {listing(methods)}")
        if any(r["certified_accuracy"].get("status") == "not_applicable" for r in records):
            did_not.append("their certification")
    exact = metrics.get("clinical", {}).get("exact")
    if isinstance(exact, dict) and exact.get("status") == "not_applicable":
        did_not.append("the clinical exact (MILP) check")
    sentence = (f"The supplied file has an op no torch form exists for ({reason}). What needs forward passes only "
                f"ran on onnxruntime on the file: {listing(did)}.")
    if did_not:
        sentence += f" What needs gradients or bounds was not possible: {listing(did_not)}."
    return [sentence]


def limitations(params, metrics: dict) -> list[str]:
    """Residual risk, each sentence computed from the metrics (or, for the gaps the reviewer must
    fill, from what params.yaml leaves unstated)."""
    attack = metrics.get("attack", {})
    notes = forward_only_scope(metrics) + attack_scope(attack) + certify_scope(metrics.get("certify", {}))
    robust = attack.get("robust_accuracy")
    if robust:
        lo, hi = robust["ci"]
        notes.append(f"All attack figures come from {robust['n']} test samples; the 95% interval on robust "
                     f"accuracy is {100 * (hi - lo):.1f} points wide.")
    threat = attack.get("threat")
    if threat:
        notes.append(lp_and_conditions_coverage(threat, metrics.get("conditions", {})))
    for name, record in conditions_of(metrics).items():
        notes += [f"Condition {name}: {sentence}" for sentence in condition_scope(record) if "FAILED" in sentence
                  or "No certificate" in sentence]
    notes += smoothing_scope(metrics.get("smooth", {}))
    for field in ("intended_purpose", "input_domain", "out_of_scope_use"):
        if getattr(params.report, field) is None:
            notes.append(f"report.{field} is not stated in params.yaml: the reviewer must supply it.")
    if params.threat.rationale is None:
        notes.append("threat.rationale is not stated: the choice of ε is not justified in the evidence.")
    if metrics.get("trace", {}).get("git_clean") == 0.0:
        notes.append("The evidence was produced from a source tree with uncommitted changes or without git: "
                     "it cannot be reproduced from a commit.")
    return notes


def _pct(a: dict) -> str:
    return f"{100 * a['value']:.1f}% [{100 * a['ci'][0]:.1f}, {100 * a['ci'][1]:.1f}]"


def clinical_findings(metrics: dict) -> list[str]:
    """The diagnostic reading, each sentence from metrics/clinical.json (and smooth's status):
    the hazard, how many positive cases are still found under the budget, calibration, the
    subgroups and how the feature types were treated."""
    clinical = metrics.get("clinical") or {}
    if clinical.get("status") != "ok":
        reason = clinical.get("reason", "metrics/clinical.json is absent (the clinical stage did not run)")
        return [f"The diagnostic figures do not apply to this run: {reason}."]
    p, name, n = clinical["positive"], clinical["positive_class"], clinical["n"]
    notes = [f"The hazard named for this classifier is {clinical['hazard']}; the positive class is “{name}”."]
    sens, robust, verified = p["sensitivity"], p["robust_sensitivity"], p["verified_sensitivity"]
    if sens["status"] == "ok":
        notes.append(
            f"Of the {p['n_positive']} “{name}” cases among {n} test cases, {sens['successes']} are detected on "
            f"clean inputs ({_pct(sens)}); {robust['successes']} stay detected under every perturbation the attacks "
            f"tried ({_pct(robust)}, an upper bound), and {verified['successes']} are proved detected for every "
            f"perturbation in the budget ({_pct(verified)}, a lower bound).")
        missed = p["n_positive"] - robust["successes"]
        notes.append(f"So at least {missed} of the {p['n_positive']} “{name}” cases are missed, on clean inputs or "
                     "under a perturbation within the budget.")
    else:
        notes.append(f"Sensitivity is undefined here: {sens['reason']}.")
    if not clinical["verified_by"]:
        notes.append("No certifier produced per-case results, so verified sensitivity counts no case.")
    calibration = clinical.get("calibration")
    if calibration:
        low, high = calibration["ece_ci"]
        notes.append(f"Expected calibration error of the {calibration['confidence']} is {calibration['ece']:.3f} "
                     f"(95% interval [{low:.3f}, {high:.3f}], {calibration['ci_method']}) over "
                     f"{len(calibration['bins'])} bins and {calibration['n']} cases.")
    smoothed = clinical.get("smoothed") or {}
    if smoothed.get("status") == "ok" or "abstained" in smoothed:
        notes.append(f"The smoothed classifier abstains on {smoothed['abstained']} of {smoothed['n']} cases "
                     f"(coverage {100 * smoothed['coverage']:.1f}%).")
    if clinical["subgroup_columns"]:
        smallest = clinical.get("smallest_subgroup")
        exact = "; the complete MILP verification" if any(g.get("exact") for g in clinical["subgroups"]) else ""
        notes.append(f"Every diagnostic figure (sensitivity and specificity clean, robust and verified; PPV and NPV "
                     f"clean and at the attacks' worst inputs; calibration; selective prediction{exact}) is repeated for "
                     f"{len(clinical['subgroups'])} subgroups of {listing(clinical['subgroup_columns'])}, each with "
                     f"its n; the smallest subgroup{f' ({smallest})' if smallest else ''} has n = "
                     f"{clinical['smallest_subgroup_n']}.")
    else:
        notes.append("Subgroup figures are not shown because params name no subgroup column (clinical.subgroups).")
    budgets = clinical.get("feature_budgets") or []
    if budgets:
        fixed = [b["name"] for b in budgets if b["radius"] == 0]
        notes.append(f"The perturbation budget is declared per feature in its own units ({len(budgets)} features"
                     + (f"; {len(fixed)} immutable: {listing(fixed[:5])}{' and others' if len(fixed) > 5 else ''})"
                        if fixed else ")") + ".")
    notes += [f"{h[0].upper()}{h[1:]}." for h in clinical.get("feature_handling", [])]
    return notes + exact_findings(clinical)


def exact_findings(clinical: dict) -> list[str]:
    """What the complete (MILP) verification decided, from metrics/clinical.json."""
    exact = (clinical or {}).get("exact") or {}
    if "verified" not in exact:
        return [f"Complete verification does not apply: {exact['reason']}."] if exact.get("reason") else []
    decided = exact["verified"] + exact["counterexample"]
    sentence = (f"Complete verification ({exact['method']}) decided {decided} of {exact['n']} test cases: "
                f"{exact['verified']} verified and {exact['counterexample']} with a counterexample the model "
                f"itself misclassifies")
    if exact["unknown"]:
        sentence += (f"; {exact['unknown']} remain unknown (time budget {exact['time_budget_s']:g} s, "
                     f"{exact['case_limit_s']:g} s per case and class)")
    return [sentence + "."]


# --- triggering conditions -----------------------------------------------------------------------

CONDITION_LABELS = {
    "brightness": "brightness", "contrast": "contrast", "brightness_contrast": "brightness and contrast",
    "gamma": "gamma", "fog": "fog/haze", "noise": "additive Gaussian noise", "blur": "Gaussian blur",
    "rotation": "rotation", "scaling": "scaling", "translation": "translation", "occlusion": "occlusion patch",
}
# The kinds a condition of each kind covers (brightness_contrast covers both of its axes).
COVERS = {"brightness_contrast": ("brightness", "contrast")}
SEARCH_LABELS = {"enumeration": "exhaustive enumeration", "grid": "a grid", "random": "random draws",
                 "gradient": "signed-gradient descent on the parameters"}
ESTIMATOR_LABELS = {"differences": "gradient signs by forward differences", "autograd": "gradients by backpropagation"}


def search_methods(search: dict) -> list[str]:
    """The search components of a condition record in words; the descent says how it took its gradient
    (records from before the estimator was recorded took it by backpropagation)."""
    estimator = ESTIMATOR_LABELS[search.get("gradient_estimator") or "autograd"]
    return [SEARCH_LABELS[c] + (f" ({estimator})" if c == "gradient" else "") for c in search["components"]]


def conditions_of(metrics: dict) -> dict[str, dict]:
    """The condition records of metrics/conditions.json, by name (empty when it is absent)."""
    return {k: v for k, v in metrics.get("conditions", {}).items() if isinstance(v, dict) and "kind" in v}


def lp_and_conditions_coverage(threat: dict, conditions_metrics: dict) -> str:
    """Which input variations the evidence speaks of, and which kinds it does not."""
    norm = {"linf": "L∞", "l2": "L2"}[threat["norm"]]
    records = {k: v for k, v in conditions_metrics.items() if isinstance(v, dict) and "kind" in v}
    covered = {kind for r in records.values() for kind in COVERS.get(r["kind"], (r["kind"],))}
    missing = [CONDITION_LABELS[k] for k in CONDITION_LABELS if k not in covered and k not in COVERS]
    if not records:
        return (f"Only the {norm} threat with ε = {threat['epsilon']:g} was evaluated; no triggering condition "
                f"was evaluated, so {listing(missing)}, weather, sensor faults and distribution shift are not "
                "covered.")
    done = listing([f"{name} ({CONDITION_LABELS[r['kind']]})" for name, r in records.items()])
    return (f"Besides the {norm} threat with ε = {threat['epsilon']:g}, the triggering conditions {done} were "
            f"evaluated over the stated ranges only; {listing(missing) if missing else 'no other condition kind'}, "
            "weather beyond a uniform haze, sensor faults and distribution shift are not covered.")


def search_exits(components: list[str]) -> str:
    """Why fewer copies were evaluated than the budget allows, for the phases that ran: random draws and the
    descent skip broken samples; the descent also stops where it would repeat a point."""
    phases = [SEARCH_LABELS[c] for c in components if c in ("random", "gradient")]
    if not phases:
        return ""
    text = f": a sample leaves the {listing(phases)} once it is broken"
    if "gradient" in components:
        text += ", and the descent stops once it returns to a point it already evaluated"
    return text


def condition_scope(record: dict, name: str = "", train: dict | None = None) -> list[str]:
    """What one condition's figures mean and where they stop, from its record (and, given the train metrics,
    whether the model was trained for it)."""
    search = record["search"]
    label = CONDITION_LABELS[record["kind"]]
    trained = condition_training_note(name, train)
    notes = [trained] if trained else []
    if search["exhaustive"]:
        notes.append(f"Every one of the {record['set_size']} parameter values of {label} was evaluated "
                     f"({search['copies_per_sample']} transformed copies per sample): the robust accuracy is exact "
                     "for this finite set.")
    else:
        how = listing(search_methods(search))
        gradient = (f", {search['gradient_copies']:,} of them with a gradient" if search["gradient_copies"] else "")
        notes.append(f"Robust accuracy under {label} is an upper bound: the worst case found by {how} "
                     f"(up to {search['copies_per_sample']} transformed copies per sample, "
                     f"{search['copies_evaluated']:,} evaluated in all{gradient}{search_exits(search['components'])}); "
                     "a stronger search may lower it.")
    if record["kind"] == "noise":
        notes.append("The noise direction is drawn at random for each evaluation: the worst case is over the "
                     "draws made, not over every noise pattern.")
    certified, certification = record["certified_accuracy"], record.get("certification")
    if certified["status"] != "ok":
        also = (" (no deterministic certificate of the model: the probabilistic certificate below is of the "
                "smoothed classifier)"
                if record.get("smoothed") else "")
        notes.append(f"No certificate for {label}: {certified['reason']}; the figure above is the search's upper "
                     f"bound only{also}.")
    elif certification["method"] == "enumeration":
        between = {"translation": "sub-pixel shifts are not covered",
                   "occlusion": "patch positions between the enumerated ones and other patch sizes are not covered"}
        notes.append(f"Certified accuracy under {label} is complete by enumeration of the {record['set_size']} values; "
                     f"{between.get(record['kind'], 'values outside the set are not covered')}.")
    else:
        unknown = record.get("unknown_share") or 0.0
        boxes = certification["max_boxes_per_sample"]
        notes.append(f"Certified accuracy under {label} is a sound lower bound from CROWN bound propagation over "
                     f"the whole parameter box, split by branch and bound into at most {boxes} "
                     f"boxes per sample ({certification['boxes']} boxes bounded); {100 * unknown:.1f}% of the "
                     "samples are neither broken by the search nor proven.")
        if certification["counterexamples"]:
            notes.append(f"Branch and bound found {certification['counterexamples']} failure(s) the search had "
                         "missed; they are counted in the robust accuracy.")
        if certification["budget_exhausted"]:
            notes.append("The box budget or time budget ended before every sample was decided; undecided samples "
                         "count as not certified.")
    if record.get("smoothed"):
        notes += parameter_smoothing_scope(record["smoothed"], record["axes"])
    for check, result in record["sanity"].items():
        if result["status"] == "fail":
            notes.append(f"Search sanity check {check} FAILED ({result['detail']}): the robust accuracy may be "
                         "overstated.")
    return notes


def parameter_smoothing_scope(smooth: dict, axes: dict) -> list[str]:
    """What the randomized-smoothing certificate over a condition's parameter certifies, and its gap."""
    axis = next(iter(axes))
    unit = "°" if smooth["units"] == "degrees" else f" {smooth['units']}"
    acc = smooth["certified_accuracy"]
    r, sigma = smooth["radius"], smooth["sigma"]
    notes = [
        f"Randomized smoothing over the {axis} (θ ~ N(0, ({sigma:g}{unit})²), {smooth['n']} draws per sample after "
        f"{smooth['n0']} selection draws, Clopper-Pearson at α = {smooth['alpha']:g}): for {acc['value']:.1%} of the "
        f"samples {_ci_text(acc)} the smoothed classifier g(x; Δ) = argmax_c P_θ[f(T(x, θ + Δ)) = c] returns the "
        f"true class for every offset |Δ| < {r:g}{unit}, each with probability at least {1 - smooth['alpha']:g} over "
        f"the draws. This is a probabilistic certificate of the smoothed classifier, not of the model f that the "
        f"search and the other figures evaluate; {smooth['abstained']} sample(s) abstained.",
        f"The certificate is over the rotation family of the original input, where angles add exactly; an input "
        f"that was already rotated and resampled is a different input (bilinear interpolation does not compose "
        f"additively): at Δ = {r:g}{unit} the two differ by {smooth['interpolation_gap_mean']:.3f} on average and up "
        f"to {smooth['interpolation_gap_max']:.3f} in the largest pixel. That gap is not covered.",
    ]
    if smooth["largest_certifiable_radius"] < r:
        notes.append(f"With n = {smooth['n']} and α = {smooth['alpha']:g} no sample can be certified beyond "
                     f"{smooth['largest_certifiable_radius']:.3g}{unit}, below the range's {r:g}{unit}: raise n or σ.")
    checked, disagreements = smooth["offsets_checked"], smooth["disagreements"]
    notes.append(f"Cross-check: the smoothed prediction at both ends of the range, re-estimated with fresh draws for "
                 f"the {checked // 2} certified sample(s), " + (
                     "never disagreed with the certified class." if not disagreements else
                     f"disagreed {disagreements} time(s) (each certificate may fail with probability α; more than "
                     "a few point to a fault)."))
    return notes


def _ci_text(accuracy: dict) -> str:
    low, high = accuracy["ci"]
    return f"(95% CI {low:.1%}–{high:.1%}, n = {accuracy['n']})"


@dataclass(frozen=True)
class TriggeringConditionRow:
    """A row of the SOTIF triggering-condition table."""

    name: str
    condition: str
    rationale: str
    parameter_range: str
    worst_case: dict
    certified: dict
    evidence: str
    requirements: list[str]


def triggering_conditions(metrics: dict, requirements: list) -> list[TriggeringConditionRow]:
    """ISO 21448 triggering conditions as the evaluation exercised them, with the policy rows naming each."""
    rows = []
    for name, record in conditions_of(metrics).items():
        certified = record["certified_accuracy"]
        if certified["status"] != "ok" and record.get("smoothed"):
            smooth = record["smoothed"]["certified_accuracy"]
            evidence = (f"empirical upper bound; the angle-smoothed classifier (not the model) is certified for "
                        f"{smooth['value']:.1%} with probability ≥ {1 - record['smoothed']['alpha']:g} each")
        elif certified["status"] != "ok":
            evidence = "empirical only (upper bound)"
        elif record["certification"]["method"] == "enumeration":
            evidence = "complete enumeration of a finite set"
        else:
            evidence = "empirical upper bound and CROWN lower bound"
        rows.append(TriggeringConditionRow(
            name=name, condition=CONDITION_LABELS[record["kind"]], rationale=record["rationale"],
            parameter_range=record["description"].split(": ", 1)[-1], worst_case=record["robust_accuracy"],
            certified=certified, evidence=evidence,
            requirements=[r.id for r in requirements if r.metric.startswith(f"conditions.{name}.")]))
    return rows
