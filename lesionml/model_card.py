"""The model card shipped with every registered version: what it is, how good, where not to use it."""

from __future__ import annotations

from lesionml.data.metadata import CLASS_NAMES, CLASSES


def _ci(m: dict, key: str) -> str:
    lo, hi = m["ci95"][key]
    return f"{m[key]:.3f} (95% CI {lo:.3f}-{hi:.3f})"


def render(
    name: str,
    version: str,
    summary: dict,
    metrics: dict,
    release: dict,
    split_table: str,
    facts: dict,
    ema_decay: float = 0.0,
) -> str:
    """`ema_decay`: the train setting the model was trained with (0: its live weights were saved)."""
    test, val = metrics["test"], metrics["val"]
    best = summary["best_epoch"]
    at = f"epochs {', '.join(map(str, best))}" if isinstance(best, list) else f"epoch {best}"
    weights = (
        f"the running average of its weights (decay {ema_decay:g} per step) at {at}"
        if ema_decay
        else f"weights of {at}"
    )
    if isinstance(best, list):
        weights = (
            f"the mean of the class probabilities of {len(best)} copies trained with seeds "
            f"{summary['seeds'][0]} to {summary['seeds'][-1]}, each with {weights}"
        )
    recall_rows = "\n".join(
        f"| {c} | {CLASS_NAMES[c]} | {test['per_class'][c]['recall']:.3f} | {test['per_class'][c]['precision']:.3f} "
        f"| {test['per_class'][c].get('roc_auc', float('nan')):.3f} | {int(test['per_class'][c]['support'])} |"
        for c in CLASSES
    )
    fact_rows = "\n".join(f"| {k} | {v} |" for k, v in facts.items())
    decision = metrics.get("decision", {})
    if decision.get("prior_correction"):
        plain = decision["argmax"]["test"]
        toward_nv = " (negative: the prior is multiplied in, toward nv)" if decision["tau"] < 0 else ""
        rule = (
            f"Decisions divide the training class prior out of the probabilities to the power "
            f"tau = {decision['tau']:.2f}{toward_nv}, {decision['objective']} "
            f"(validation figures are therefore optimistic; test is untouched). Plain argmax scored test accuracy "
            f"{plain['accuracy']:.3f} and balanced accuracy {plain['balanced_accuracy']:.3f}."
        )
    else:
        rule = "Decisions are the most probable class (no prior correction)."
    if decision.get("temperature", 1.0) != 1.0:
        rule += (
            f" Probabilities are temperature-scaled (T = {decision['temperature']:.3f}, fitted on validation "
            f"log loss{', before the prior correction was tuned' if decision.get('prior_correction') else ''}; "
            f"the scaling alone changes no decision): test expected calibration error "
            f"{decision['raw_ece']['test']:.3f} before, {test['ece']:.3f} after."
        )
    if decision.get("operating_point") == "melanoma_sensitivity":
        change = decision["test_change"]

        def moved(key: str) -> str:
            lo, hi = change[key]["ci95"]
            return f"{change[key]['change']:+.3f} (95% CI {lo:+.3f} to {hi:+.3f})"

        rule += (
            f" **Operating point: melanoma sensitivity.** On top of that, melanoma's log-probability gets the "
            f"offset {decision['melanoma_offset']:+.3f}, the smallest giving validation melanoma sensitivity >= "
            f"{decision['mel_sensitivity_target']:.2f}. On test it reaches melanoma sensitivity "
            f"{_ci(test, 'mel_sensitivity')} and specificity (melanoma vs rest) {_ci(test, 'mel_specificity')}; "
            f"against the same rule without the offset, paired over the same resampled lesions: melanoma "
            f"sensitivity {moved('mel_sensitivity')}, specificity {moved('mel_specificity')}, accuracy "
            f"{moved('accuracy')}, balanced accuracy {moved('balanced_accuracy')}."
        )
    if "rule" in decision:
        rule += f"\n\nThe served model applies: {decision['rule']}."
    if "test_withheld" in metrics:
        off = metrics["test_withheld"]
        rule += (
            "\n\nInputs: the image and the patient's age, sex and lesion site (HAM10000's metadata; an image "
            "sent without them takes the model's withheld path). The metrics below are with metadata, and the "
            "decision rule was fitted on validation probabilities computed with it. The same rule with every "
            f"image's metadata withheld: test accuracy {off['accuracy']:.3f}, balanced accuracy "
            f"{off['balanced_accuracy']:.3f}, melanoma sensitivity {off['mel_sensitivity']:.3f}."
        )
    return f"""# Model card: {name} version {version} ({summary["model"]})

## What it is
A {summary["model"]} image classifier ({summary["parameters"]:,} parameters) for 7 classes of pigmented skin
lesions in dermatoscopic images, trained from scratch by lesionml on HAM10000. Input: an RGB
dermatoscopic image of any size (resized to {summary["image_size"][0]}x{summary["image_size"][1]}); output: a probability
per class. Normalization statistics (training split only) are the model's first layer.

## Data and split
HAM10000 release with {release["images"]} images of {release["lesions"]} lesions, content fingerprint
`{release["fingerprint"]}`. Split by lesion (no lesion in two splits), stratified by diagnosis:

```
{split_table}
```

Trained {summary["epochs_run"]} epochs; {weights} (best on validation).

## Performance (held-out test split; 95% intervals resample lesions)
{rule}

| metric | test | validation |
|---|---|---|
| accuracy | {_ci(test, "accuracy")} | {_ci(val, "accuracy")} |
| balanced accuracy | {_ci(test, "balanced_accuracy")} | {_ci(val, "balanced_accuracy")} |
| macro-F1 | {test["macro_f1"]:.3f} | {val["macro_f1"]:.3f} |
| macro ROC AUC (one-vs-rest) | {test.get("roc_auc_macro", float("nan")):.3f} | {val.get("roc_auc_macro", float("nan")):.3f} |
| melanoma sensitivity | {test["mel_sensitivity"]:.3f} | {val["mel_sensitivity"]:.3f} |
| melanoma specificity | {test["mel_specificity"]:.3f} | {val["mel_specificity"]:.3f} |
| expected calibration error | {test["ece"]:.3f} | {val["ece"]:.3f} |

Per class on test:

| class | name | recall | precision | ROC AUC | images |
|---|---|---|---|---|---|
{recall_rows}

## Provenance
| | |
|---|---|
{fact_rows}

## Intended use and limits
- Research and engineering use: comparing models, teaching, building ML infrastructure.
- **Not a medical device.** It must not be used to diagnose, triage or reassure patients.
- Trained on HAM10000's population: mostly fair-skinned patients from Austria and Australia,
  images from specific dermatoscopes, lesions selected for the dataset. Expect worse and
  unmeasured performance on other skin types, devices, body sites or clinical settings.
- 7 classes only: any other lesion (or a non-lesion image) is still forced into one of them.
- Rare classes (df, vasc, akiec) have few test lesions: their recall is uncertain (see intervals).
"""
