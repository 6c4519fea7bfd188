"""The report never says what its metrics refute.

Renders the report for several param sets (attack subsets, sweeps on and off, each family of
training method, smoothing on and off, L∞ and L2, independent and sequential attacks) and reads
every sentence against the metrics files of the same run. The first shipped report said "APGD
and Square were not run" while both had run; each rule below would have caught such a sentence.
"""
from __future__ import annotations

import copy
import html as html_lib
import json
import re
from pathlib import Path

import pytest

from pipeline.claims import ATTACK_NAMES, CONDITION_LABELS, COVERS, GRADIENT_FREE, METHOD_NAMES
from tests.conftest import TINY_PARAMS, make_workspace, run_stage

NEGATIONS = ("not run", "did not run", "were not run", "was not run", "not covered", "no sweep", "is off",
             "not applicable", "not claimed")
SELECTIONS = ("val_clean_accuracy", "val_robust_accuracy", "val_verified_accuracy")


def variant(**changes) -> dict:
    params = copy.deepcopy(TINY_PARAMS)
    for dotted, value in changes.items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return params


VARIANTS = {
    "pgd_at_full": variant(),
    "subset_no_sweeps_no_smoothing": variant(**{
        "attack.attacks": ["pgd"], "attack.masking": {"enabled": False}, "certify.methods": ["ibp"],
        "certify.sweep": False, "smoothing.enabled": False}),
    "gaussian_l2_smoothing": variant(**{
        "train.method": "gaussian", "train.pgd": None, "threat": {"norm": "l2", "epsilon": 0.3},
        "attack.attacks": ["pgd", "square"], "certify.methods": ["crown"], "smoothing.sigma": 0.25}),
    "ibp_sequential": variant(**{
        "train.method": "ibp", "train.pgd": None, "attack.mode": "sequential",
        "certify.methods": ["ibp", "crown_ibp"]}),
    "standard_independent": variant(**{"train.method": "standard", "train.pgd": None,
                                       "attack.attacks": ["fgsm", "apgd_ce", "apgd_t"]}),
    # issue 17: a diagnostic classifier in raw units with per-feature budgets, medical profile and policy
    "medical_breast_cancer": variant(**{
        "data": {"dataset": "breast_cancer"}, "model": {"name": "mlp", "hidden": [16]},
        "threat": {"norm": "linf", "epsilon": 1.0, "features": {"mean radius": {"absolute": 0.3}, "worst area": "immutable"},
                   "unlisted": {"std": 0.05}},
        "train.pgd": {"steps": 3, "step_size": 0.5}, "train.val_pgd": {"steps": 3, "step_size": 0.5},
        "attack.pgd": {"steps": 10, "step_size": 0.2, "restarts": 1},
        "clinical": {"positive_class": "malignant", "bootstrap": 200},
        "report": {"profile": "medical"}, "gate.policy": "policies/medical.yaml", "conditions.threats": {}}),
    # triggering conditions: empirical-only kinds, certification switched off, enumeration (TINY_PARAMS
    # itself has a certified brightness and an enumerated translation); and none at all
    "conditions_uncertified": variant(**{"conditions.certify": {"enabled": False}, "conditions.threats": {
        "roll": {"kind": "rotation", "range": [-5.0, 5.0], "rationale": "mount"},
        "haze": {"kind": "fog", "range": [0.0, 0.2], "rationale": "haze"},
        "grain": {"kind": "noise", "sigma": 0.05, "rationale": "sensor noise"},
        "dirt": {"kind": "occlusion", "size": 2, "stride": 3, "rationale": "dirt on the lens"}}}),
    "no_conditions": variant(**{"conditions.threats": {}}),
}


def sentences(html: str) -> list[str]:
    body = html.split("<body>", 1)[1]
    body = re.sub(r"<details>.*?</details>", " ", body, flags=re.S)  # params.yaml as run: not prose
    text = html_lib.unescape(re.sub(r"<[^>]+>", " ", body))
    text = re.sub(r"\s+", " ", text)
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z(])", text) if s.strip()]


def mentions(sentence: str, label: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(label)}(?![\w-])", sentence) is not None


def contradictions(html: str, metrics: dict[str, dict]) -> list[str]:
    """Every sentence of the report that the metrics refute, with the reason."""
    found = []
    attack, certify, smooth, train = (metrics.get(s, {}) for s in ("attack", "certify", "smooth", "train"))
    ran_attacks = set(attack.get("attacks", {}))
    ran_methods = {m for m, a in certify.get("verified_accuracy", {}).items() if a.get("status") == "ok"}
    text = sentences(html)
    for sentence in text:
        lowered = sentence.lower()
        negative = any(n in lowered for n in NEGATIONS)
        if negative:
            for name in ran_attacks:
                if mentions(sentence, ATTACK_NAMES[name]) and "did not." not in lowered.split(ATTACK_NAMES[name].lower())[-1]:
                    found.append(f"says {ATTACK_NAMES[name]} did not run, but it ran: {sentence!r}")
            if certify.get("sweep") and "certified" in lowered and ("sweep" in lowered or "against ε" in lowered):
                found.append(f"denies the certified ε sweep that ran: {sentence!r}")
            if smooth.get("status") == "ok" and "smoothing" in lowered:
                found.append(f"denies the randomized smoothing that ran: {sentence!r}")
            if attack.get("masking") and "masking" in lowered and "checks" in lowered:
                found.append(f"denies the masking checks that ran: {sentence!r}")
            if certify.get("status") == "ok" and "formal verification" in lowered:
                found.append(f"denies the formal verification that ran: {sentence!r}")
        match = re.search(r"against the attacks that ran \(([^)]*?), (independent|sequential) mode\)", sentence)
        if match:
            listed = {label for label in ATTACK_NAMES.values() if mentions(match.group(1), label)}
            if listed != {ATTACK_NAMES[a] for a in ran_attacks} or match.group(2) != attack["mode"]:
                found.append(f"lists other attacks or mode than ran ({sorted(ran_attacks)}, {attack['mode']}): "
                             f"{sentence!r}")
        for selection in SELECTIONS:
            if f"highest {selection.replace('_', ' ')}" in sentence and selection != train["selected_by"]:
                found.append(f"says the checkpoint was chosen by {selection}, train chose by "
                             f"{train['selected_by']}: {sentence!r}")
    joined = " ".join(text)
    found += clinical_contradictions(text, metrics.get("clinical", {}))
    if f"highest {train['selected_by'].replace('_', ' ')}" not in joined:
        found.append(f"never states the selection rule {train['selected_by']}")
    for method, label in METHOD_NAMES.items():
        shown = f"Verified accuracy, {label} " in joined
        if shown != (method in ran_methods):
            found.append(f"summary {'shows' if shown else 'omits'} verified accuracy by {label}; ran: {sorted(ran_methods)}")
    knowledge = next(s for s in text if "Attacker knowledge" in s)
    if ("white-box" in knowledge) != bool(ran_attacks - set(GRADIENT_FREE)):
        found.append(f"white-box claim does not match the attacks run: {knowledge!r}")
    if ("black-box" in knowledge) != bool(ran_attacks & set(GRADIENT_FREE)):
        found.append(f"black-box claim does not match the attacks run: {knowledge!r}")
    if ("certification" in knowledge) != (certify.get("status") == "ok"):
        found.append(f"certification claim does not match the certify stage: {knowledge!r}")
    if smooth.get("status") == "ok":
        limit = smooth["threat_coverage"]
        if limit not in joined:
            found.append("the smoothing limit (largest certifiable radius against the threat) is not stated")
        r_max, dims = smooth["max_certifiable_radius"], smooth["input_dimension"]
        threat = attack["threat"]
        needed = threat["epsilon"] * dims ** 0.5 if threat["norm"] == "linf" else threat["epsilon"]
        if ("cannot certify" in limit) != (r_max < needed):
            found.append(f"smoothing limit says the opposite of r_max {r_max:.3g} vs needed {needed:.3g}: {limit!r}")
    found += condition_contradictions(text, metrics.get("conditions", {}))
    return found


def condition_contradictions(text: list[str], conditions: dict) -> list[str]:
    """Sentences about triggering conditions that metrics/conditions.json refutes."""
    found = []
    records = {k: v for k, v in conditions.items() if isinstance(v, dict) and "kind" in v}
    covered = {kind for r in records.values() for kind in COVERS.get(r["kind"], (r["kind"],))}
    joined = " ".join(text)
    for sentence in text:
        lowered = sentence.lower()
        for clause in (c for c in lowered.split(";") if "not covered" in c):
            for kind in covered:
                if re.search(rf"(?<![\w/-]){re.escape(CONDITION_LABELS[kind])}(?![\w/-])", clause):
                    found.append(f"says {kind} is not covered, but a {kind} condition ran: {sentence!r}")
        if records and "no triggering condition was evaluated" in lowered:
            found.append(f"denies the conditions that ran ({sorted(records)}): {sentence!r}")
        for name, record in records.items():
            label = CONDITION_LABELS[record["kind"]]
            certified = record["certified_accuracy"]["status"] == "ok"
            if f"no certificate for {label}" in lowered and any(
                    r["certified_accuracy"]["status"] == "ok" for r in records.values() if r["kind"] == record["kind"]):
                found.append(f"denies the certificate of {name}: {sentence!r}")
            match = re.search(rf"Certified accuracy under {re.escape(label)} is a sound lower bound .*? "
                              r"([\d.]+)% of the samples are neither broken", sentence)
            shares = [100 * (r["unknown_share"] or 0) for r in records.values() if r["kind"] == record["kind"]]
            if match and all(abs(float(match.group(1)) - share) > 0.051 for share in shares):
                found.append(f"states an unknown share other than the metrics' {shares}: {sentence!r}")
    for name, record in records.items():
        label = CONDITION_LABELS[record["kind"]]
        status = record["certified_accuracy"]["status"]
        if status != "ok" and f"No certificate for {label}: {record['certified_accuracy']['reason']}" not in joined:
            found.append(f"never says why {name} has no certificate")
        if status == "ok" and record["certification"]["method"] == "enumeration" and \
                f"Certified accuracy under {label} is complete by enumeration" not in joined:
            found.append(f"never says {name} is certified by enumeration")
        if status == "ok" and record["certification"]["method"] == "crown_bab" and \
                f"Certified accuracy under {label} is a sound lower bound from CROWN" not in joined:
            found.append(f"never states how {name} is certified")
        for check, result in record["sanity"].items():
            if result["status"] == "fail" and f"Search sanity check {check} FAILED" not in joined:
                found.append(f"hides the failed search sanity check {check} of {name}")
    if not records and conditions and "no triggering condition was evaluated" not in joined.lower():
        found.append("never says that no triggering condition was evaluated")
    return found


def clinical_contradictions(text: list[str], clinical: dict) -> list[str]:
    """The diagnostic sentences against metrics/clinical.json: the hazard is named, the positive
    cases counted are those the metrics hold, and nothing that ran is denied."""
    found = []
    joined = " ".join(text)
    if clinical.get("status") != "ok":
        if "Robust sensitivity" in joined or "are detected on clean inputs" in joined:
            found.append("shows diagnostic figures the clinical stage did not produce")
        return found
    p = clinical["positive"]
    if f"The hazard named for this classifier is {clinical['hazard']}" not in joined:
        found.append("does not name the hazard of metrics/clinical.json")
    for sentence in text:
        match = re.search(r"Of the (\d+) “([^”]+)” cases among (\d+) test cases, (\d+) are detected on clean inputs"
                          r".*?; (\d+) stay detected.*?, and (\d+) are proved detected", sentence)
        if match:
            said = tuple(int(g) for g in match.group(1, 3, 4, 5, 6))
            truth = (p["n_positive"], clinical["n"], p["sensitivity"]["successes"],
                     p["robust_sensitivity"]["successes"], p["verified_sensitivity"]["successes"])
            if said != truth or match.group(2) != clinical["positive_class"]:
                found.append(f"positive-case counts {said} differ from the metrics {truth}: {sentence!r}")
        lowered = sentence.lower()
        if any(n in lowered for n in NEGATIONS) or "not shown" in lowered:
            if "subgroup" in lowered and clinical["subgroups"]:
                found.append(f"denies the subgroup figures that were computed: {sentence!r}")
            if "calibration" in lowered and clinical.get("calibration"):
                found.append(f"denies the calibration that was computed: {sentence!r}")
    if "are detected on clean inputs" not in joined and p["sensitivity"]["status"] == "ok":
        found.append("never states the sensitivity counts")
    return found


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def rendered(request, tmp_path_factory) -> tuple[str, dict]:
    root = make_workspace(tmp_path_factory.mktemp(request.param), VARIANTS[request.param])
    for stage in ("prepare", "train", "attack", "certify", "smooth", "clinical", "conditions", "export", "report"):
        assert run_stage(stage, root) == 0, (request.param, stage)
    metrics = {p.stem: json.loads(p.read_text()) for p in (root / "metrics").glob("*.json")}
    return (root / "reports/build/report.html").read_text(), metrics


def test_no_sentence_contradicts_the_metrics(rendered):
    html, metrics = rendered
    assert contradictions(html, metrics) == []


def test_the_checker_catches_the_sentences_the_first_report_shipped(rendered):
    """The rules are not vacuous: the old template's sentences fail them on the same metrics."""
    html, metrics = rendered
    ran = metrics["attack"]["attacks"]
    planted = html.replace("<h2 id=\"limitations\">", "<p>Stronger or adaptive attacks (APGD-CE, Square, attacks "
                           "tailored to this model) were not run and may lower it.</p><p>Only ε = 0.05 was certified "
                           "(no sweep over ε).</p><p>Checkpoint chosen by the highest val robust accuracy.</p>"
                           "<h2 id=\"limitations\">")
    problems = contradictions(planted, metrics)
    if "apgd_ce" in ran or "square" in ran:
        assert any("did not run, but it ran" in p for p in problems)
    if metrics["certify"].get("sweep"):
        assert any("certified ε sweep" in p for p in problems)
    if metrics["train"]["selected_by"] != "val_robust_accuracy":
        assert any("chosen by val_robust_accuracy" in p for p in problems)
    if metrics.get("clinical", {}).get("status") == "ok":
        p = metrics["clinical"]["positive"]
        wrong = html.replace(f"{p['robust_sensitivity']['successes']} stay detected",
                             f"{p['robust_sensitivity']['successes'] + 1} stay detected")
        assert any("positive-case counts" in problem for problem in contradictions(wrong, metrics))


def test_the_checker_catches_condition_sentences_the_metrics_refute(rendered):
    """The condition rules are not vacuous: the limitation sentence the report printed before
    conditions existed, and a denial that any condition ran, fail them whenever conditions ran."""
    html, metrics = rendered
    records = {k: v for k, v in metrics["conditions"].items() if isinstance(v, dict) and "kind" in v}
    if not records:
        return
    kind = next(iter(records.values()))["kind"]
    label = CONDITION_LABELS[COVERS.get(kind, (kind,))[0]]
    planted = html.replace("<h2 id=\"limitations\">", "<p>Only the L∞ threat with ε = 0.05 was evaluated; other "
                           f"variations ({label}, rotation, blur, weather, sensor faults, distribution shift) are not "
                           "covered.</p><p>No triggering condition was evaluated.</p><h2 id=\"limitations\">")
    problems = contradictions(planted, metrics)
    assert any(f"is not covered, but a" in p for p in problems), problems
    assert any("denies the conditions that ran" in p for p in problems), problems


def test_pdf_contents_lines_do_not_overlap(pipeline_workspace):
    """The table of contents is one column: each entry's page number ends its own line."""
    import subprocess

    pdf = Path(pipeline_workspace) / "reports/build/report.pdf"
    text = subprocess.run(["pdftotext", "-layout", "-f", "1", "-l", "1", str(pdf), "-"], capture_output=True,
                          text=True, check=True).stdout
    entries = [line for line in text.splitlines() if re.match(r"\s*\d+\. [A-Z]", line) and "...." in line]
    assert len(entries) == 16
    for line in entries:
        assert len(re.findall(r"(?<![\d.])\d+\. [A-Z]", line)) == 1, line  # one entry per line, no second column
        assert re.search(r"\.\s*\d+\s*$", line), line  # leader dots, then the page number, nothing after
