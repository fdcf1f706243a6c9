"""The two web UIs as a person uses them, over stores filled by a real (tiny) retraining run.

One session fixture starts a real MLflow server (its UI included) and uses the session's
Prefect server (its UI on), then runs `lesionml retrain` twice: the first retrains (two
models, so there are two runs to compare, and a champion), the second stops early. The
artifacts the runs published are read back from the Prefect API and compared with the
run's files; then headless Chromium follows the clicks docs/ui.md describes and finds the
run's own numbers on the pages. Screenshots land in the session's temp folder
(`ui-screenshots*`); against empty stores every browser test fails.
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from lesionml.data.split import split_counts
from tests.helpers import SAMPLE, TINY, prefect_api, run_lesionml, start_mlflow_server, write_params

pytestmark = pytest.mark.integration
MODELS = ("cnn", "cnn_lstm")
TWO_MODELS = {
    **TINY,
    "evaluate": {**TINY["evaluate"], "tta": False},
    "models": {
        "enabled": list(MODELS),
        "cnn": TINY["models"]["cnn"],
        "cnn_lstm": {"filters": [8, 16], "lstm_units": 8, "dense_units": 8},
    },
}
HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_macro", "mel_sensitivity")
METRIC = "eval_test_balanced_accuracy"  # the MLflow metric of metrics.json's test balanced_accuracy
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # as root there is no sandbox to run in
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@dataclass(frozen=True)
class UIRun:
    prefect_api: str
    prefect_ui: str
    mlflow: str
    experiment_id: str
    outputs: list[str]  # what each `lesionml retrain` printed
    pipeline_run: dict  # the Prefect flow run that trained and registered
    retrain_runs: list[dict]  # the two retraining flow runs, oldest first
    mlflow_run_id: str  # the MLflow pipeline run of the first retraining
    release: dict
    counts: pd.DataFrame
    metrics: dict[str, dict]
    summaries: dict[str, dict]
    decision: dict


def _flow_runs(server: str, flow: str, params: Path) -> list[dict]:
    body = {"flows": {"name": {"any_": [flow]}}, "sort": "START_TIME_ASC"}
    return [r for r in prefect_api(server, "/flow_runs/filter", body) if r["parameters"]["params_file"] == str(params)]


def _artifacts(server: str, flow_run_id: str) -> dict[str, dict]:
    found = prefect_api(server, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    return {a["key"]: a for a in found}


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, start_server) -> str:
    store = tmp_path_factory.mktemp("mlflow-ui-store")
    return start_mlflow_server(store, start_server)[1]


@pytest.fixture(scope="session")
def ui_run(prefect_server, mlflow_server, tmp_path_factory) -> UIRun:
    tmp = tmp_path_factory.mktemp("ui-run")
    params = write_params(tmp, SAMPLE, **TWO_MODELS, tracking={"uri": mlflow_server}).resolve()
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server,
        "PREFECT_HOME": str(tmp / "client-home"),
        "PREFECT_LOGGING_LEVEL": "INFO",  # the flow's printed lines, as a person sees them
    }
    outputs = []
    for _ in range(2):
        done = run_lesionml("retrain", "--params", str(params), env=env, timeout=900)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        outputs.append(done.stdout + done.stderr)
    [pipeline_run] = [
        r for r in _flow_runs(prefect_server, "lesionml-pipeline", params) if r["parameters"]["until"] == "register"
    ]
    mlflow_run_id = re.search(r"^retrained; .*MLflow run ([0-9a-f]{32})", outputs[0], re.MULTILINE).group(1)
    with urllib.request.urlopen(
        f"{mlflow_server}/api/2.0/mlflow/experiments/get-by-name?experiment_name=lesionml"
    ) as r:
        experiment_id = json.load(r)["experiment"]["experiment_id"]
    ws = tmp / "ws"
    return UIRun(
        prefect_api=prefect_server,
        prefect_ui=prefect_server.removesuffix("/api"),
        mlflow=mlflow_server,
        experiment_id=experiment_id,
        outputs=outputs,
        pipeline_run=pipeline_run,
        retrain_runs=_flow_runs(prefect_server, "lesionml-retrain", params),
        mlflow_run_id=mlflow_run_id,
        release=json.loads((ws / "ingest" / "release.json").read_text()),
        counts=split_counts(pd.read_csv(ws / "split" / "split.csv")),
        metrics={m: json.loads((ws / "evaluate" / m / "metrics.json").read_text()) for m in MODELS},
        summaries={m: json.loads((ws / "train" / m / "summary.json").read_text()) for m in MODELS},
        decision=json.loads((ws / "register" / "decision.json").read_text()),
    )


def _run_link(run: UIRun, run_id: str) -> str:
    return f"{run.mlflow}/#/experiments/{run.experiment_id}/runs/{run_id}?workflowType=machine_learning"


def _markdown_tables(text: str) -> list[list[list[str]]]:
    """Each pipe table of a markdown text as rows of cells, without its separator row."""
    tables, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            if not re.fullmatch(r"\|(---\|)+", line):
                current.append([cell.strip() for cell in line.strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


def _with_interval(m: dict, key: str) -> str:
    low, high = m["ci95"][key]
    return f"{m[key]:.3f} [{low:.3f}, {high:.3f}]"


def test_the_pipeline_run_publishes_its_files_as_a_summary_and_a_metrics_table(ui_run):
    arts = _artifacts(ui_run.prefect_api, ui_run.pipeline_run["id"])
    assert set(arts) == {"lesionml-summary", "lesionml-metrics"}
    assert arts["lesionml-summary"]["type"] == "markdown" and arts["lesionml-metrics"]["type"] == "table"

    table = json.loads(arts["lesionml-metrics"]["data"])
    assert [(row["model"], row["split"]) for row in table] == [(m, s) for m in MODELS for s in ("val", "test")]
    for row in table:
        m = ui_run.metrics[row["model"]][row["split"]]
        for key in HEADLINE:
            assert row[key] == round(m[key], 4), (row["model"], row["split"], key)
            assert [row[f"{key}_ci95_low"], row[f"{key}_ci95_high"]] == [round(v, 4) for v in m["ci95"][key]]
        assert row["ece"] == round(m["ece"], 4)
        assert row["mlflow_run_id"] == ui_run.summaries[row["model"]]["run_id"]

    text = arts["lesionml-summary"]["data"]
    release = ui_run.release
    assert f"`{release['source']}`: {release['images']} images of {release['lesions']} lesions" in text
    assert f"fingerprint `{release['fingerprint']}`" in text
    counts, test_metrics = _markdown_tables(text)
    assert counts == [
        ["class", *ui_run.counts.columns],
        *[[dx, *(str(v) for v in row)] for dx, row in ui_run.counts.iterrows()],
    ]
    assert [row[0] for row in test_metrics[1:]] == list(MODELS)
    for name, row in zip(MODELS, test_metrics[1:], strict=True):
        m = ui_run.metrics[name]["test"]
        assert row[1:6] == [_with_interval(m, key) for key in HEADLINE]
        run_id = ui_run.summaries[name]["run_id"]
        assert row[-1] == f"[{run_id[:8]}]({_run_link(ui_run, run_id)})"
    decision = ui_run.decision
    verdict = "**promoted to champion**" if decision["promote"] else "**not promoted**"
    challenger = f"Challenger: {decision['challenger']['model']} (version {decision['challenger']['version']})"
    assert f"{challenger}, {verdict}" in text
    assert f"Reason: {decision['reason']}" in text
    assert f"[{ui_run.mlflow_run_id}]({_run_link(ui_run, ui_run.mlflow_run_id)})" in text


def test_retraining_publishes_whether_it_retrained_or_stopped_early_and_why(ui_run):
    first, second = (_artifacts(ui_run.prefect_api, run["id"]) for run in ui_run.retrain_runs)
    assert set(first) == set(second) == {"lesionml-retrain"}
    retrained, stopped = first["lesionml-retrain"]["data"], second["lesionml-retrain"]["data"]
    link = f"[{ui_run.mlflow_run_id}]({_run_link(ui_run, ui_run.mlflow_run_id)})"

    assert retrained.startswith("# lesionml retraining: retrained\n")
    assert "retraining: no successful run has identity" in retrained
    promoted = "yes" if ui_run.decision["promote"] else "no"
    assert f"Registry decision: {ui_run.decision['reason']} (champion moved: {promoted})" in retrained
    assert f"Pipeline run in MLflow: {link}" in retrained

    assert stopped.startswith("# lesionml retraining: stopped early\n")
    assert f"nothing changed since MLflow run {ui_run.mlflow_run_id}" in stopped
    assert f"Unchanged since MLflow run: {link}" in stopped
    assert "Registry decision" not in stopped
    # Each retraining first checks its release with an ingest-only pipeline run: those publish
    # nothing, or a summary of a bare release would hide the last results under the same key.
    checks = [
        r
        for r in _flow_runs(
            ui_run.prefect_api, "lesionml-pipeline", Path(ui_run.pipeline_run["parameters"]["params_file"])
        )
        if r["parameters"]["until"] == "ingest"
    ]
    assert len(checks) == 2
    assert all(_artifacts(ui_run.prefect_api, r["id"]) == {} for r in checks)


def test_a_training_run_prints_each_stage_as_it_starts_and_ends(ui_run):
    """Stage k of n, with the time into the run; per-epoch lines inside training."""
    output = ui_run.outputs[0]
    plan = ["ingest", "preprocess", "split", "normalize", "augment"]
    plan += [f"{stage}.{m}" for m in MODELS for stage in ("train", "evaluate")] + ["register"]
    lines = re.findall(r"\[(\d+)/10\] (\S+) (\.\.\.|ran|cached) \((?:\d+\.\d s; )?\d+:\d\d into the run\)", output)
    assert sorted({(int(k), label) for k, label, _ in lines}) == list(enumerate(plan, 1))
    position = {(label, word != "..."): output.index(f"/10] {label} {word} (") for _, label, word in lines}
    assert len(position) == 2 * len(plan)  # each stage once as it starts and once as it ends
    for label in plan:
        assert position[label, False] < position[label, True], label
    for m in MODELS:
        assert position[f"train.{m}", True] < position[f"evaluate.{m}", False]
        epoch = output.index("epoch   1/1", position[f"train.{m}", False])
        assert epoch < position[f"train.{m}", True]


# -- In the browser --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def browser():
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is not installed (apt-get install chromium)"
        if os.environ.get("LESIONML_REQUIRE_BROWSER") == "1":
            pytest.fail(message + "; LESIONML_REQUIRE_BROWSER=1 requires it")
        pytest.skip(message)
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)  # as for every action (`page`): a first page load on a busy two-core machine
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ui-screenshots")


@pytest.fixture
def page(browser):
    """A fresh browser profile per test: every UI shows what it shows a first-time visitor."""
    context = browser.new_context(viewport={"width": 1600, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)  # the first load of a UI on a busy two-core machine
    yield page
    context.close()


def _mlflow_model_training(page, ui_run: UIRun) -> None:
    """MLflow opens on its GenAI home; runs and models live under "Model training"."""
    from playwright.sync_api import expect

    page.goto(ui_run.mlflow)
    page.get_by_text("Model training", exact=True).first.click()
    expect(page.get_by_role("link", name="Model registry")).to_be_visible()  # in the sidebar once switched


def test_mlflow_runs_table_then_compare_view_show_the_models_test_balanced_accuracy(browser, page, screenshots, ui_run):
    from playwright.sync_api import expect

    _mlflow_model_training(page, ui_run)
    page.get_by_role("link", name="lesionml", exact=True).click()
    pipeline_row = page.get_by_role("row").filter(has=page.get_by_role("link", name="pipeline", exact=True))
    page.get_by_role("button", name="Close").click()  # the assistant panel, which narrows the table
    pipeline_row.get_by_role("button").first.click()  # the + that unfolds the model runs
    # Metrics are not columns until chosen: Columns, search the metric, tick it.
    page.get_by_role("button", name="Columns").click()
    page.get_by_placeholder("Search columns").fill(METRIC)
    page.locator('[class*="tree-treenode"]').filter(has_text=re.compile(rf"^{METRIC}$")).locator(
        '[class*="tree-checkbox"]'
    ).first.click()
    page.keyboard.press("Escape")
    for name in MODELS:
        row = page.locator(f'[row-id="{ui_run.summaries[name]["run_id"]}"]')
        expect(row.get_by_role("link", name=name, exact=True)).to_be_visible()
        shown = row.locator(f'[col-id$="`{METRIC}`"]').inner_text()
        assert f"{float(shown):.3f}" == f"{ui_run.metrics[name]['test']['balanced_accuracy']:.3f}", name
    page.screenshot(path=screenshots / "mlflow-runs.png")

    for name in MODELS:
        page.locator(f'[row-id="{ui_run.summaries[name]["run_id"]}"] input[type=checkbox]').first.check()
    page.get_by_role("button", name="Compare").click()
    expect(page.get_by_text("Comparing 2 Runs")).to_be_visible()
    # The parallel-coordinates chart: add the metric to its Metrics box (the second box).
    page.locator("input[role=combobox]").nth(1).click(force=True)
    page.keyboard.type(METRIC)
    page.get_by_title(METRIC, exact=True).click()
    page.get_by_text("Comparing 2 Runs").click()  # away from the box, which closes its list
    chart = page.locator(".js-plotly-plot").first
    expect(chart).to_contain_text(METRIC)
    for name in MODELS:  # each run's value labels an end of the metric's axis
        expect(chart).to_contain_text(f"{ui_run.metrics[name]['test']['balanced_accuracy']:.5f}")
    page.screenshot(path=screenshots / "mlflow-compare.png")


def test_mlflow_registry_shows_the_champion_alias_on_the_promoted_version(browser, page, screenshots, ui_run):
    from playwright.sync_api import expect

    decision = ui_run.decision
    assert decision["promote"], "the first run of a fresh registry makes its challenger champion"
    champion = decision["challenger"]["version"]
    _mlflow_model_training(page, ui_run)
    page.get_by_role("link", name="Model registry").click()
    page.get_by_role("button", name="Try it now").click()  # the first visit's pop-up about the new registry UI
    page.get_by_role("link", name="lesionml", exact=True).first.click()
    for name, version in decision["versions"].items():
        row = page.get_by_role("row").filter(has=page.get_by_role("link", name=f"Version {version}", exact=True))
        expect(row).to_contain_text(f"MLflow run: {ui_run.summaries[name]['run_id']}")  # the version's tag
        if version == champion:
            expect(row).to_contain_text(re.compile(r"@\s*champion"))
        else:
            expect(row).not_to_contain_text(re.compile(r"@\s*champion"))
    page.screenshot(path=screenshots / "mlflow-registry.png")


def test_prefect_flow_run_shows_its_summary_artifact_which_links_to_mlflow(browser, page, screenshots, ui_run):
    from playwright.sync_api import expect

    run = ui_run.pipeline_run
    page.goto(ui_run.prefect_ui)
    page.get_by_role("link", name="Runs", exact=True).click()
    page.get_by_role("link", name=run["name"], exact=True).click()
    page.get_by_role("tab", name="Artifacts").click()
    expect(page.get_by_text("lesionml-metrics", exact=True)).to_be_visible()
    page.screenshot(path=screenshots / "prefect-flow-run.png")
    page.get_by_text("lesionml-summary", exact=True).click()  # the key's page: its versions, newest first
    artifact = _artifacts(ui_run.prefect_api, run["id"])["lesionml-summary"]
    page.get_by_role("link", name=artifact["id"][:8], exact=True).click()
    name = MODELS[0]
    expect(page.get_by_role("main")).to_contain_text(_with_interval(ui_run.metrics[name]["test"], "balanced_accuracy"))
    page.screenshot(path=screenshots / "prefect-artifact.png", full_page=True)

    run_id = ui_run.summaries[name]["run_id"]
    link = page.get_by_role("link", name=run_id[:8], exact=True)
    assert link.get_attribute("href") == _run_link(ui_run, run_id)
    page.goto(link.get_attribute("href"))  # where the link leads: the model's run in MLflow
    expect(page.get_by_role("heading", name=name, exact=True)).to_be_visible()
