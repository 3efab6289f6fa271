"""docs/RESULTS.md against the data it reads: every table recomputed from the committed per-run
values (docs/results/fashion_mnist_normalizers/runs.csv) with scripts/report.py's own functions,
the "beyond the spread" pairs it lists, and the counts its text states."""
import csv
import os
import re
import statistics

import pytest

from helpers import ROOT, load_script

report = load_script("report")
DOC = os.path.join(ROOT, "docs", "RESULTS.md")
RUNS = os.path.join(ROOT, "docs", "results", "fashion_mnist_normalizers", "runs.csv")
WORDS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]


@pytest.fixture(scope="module")
def runs():
    with open(RUNS) as f:
        rows = [r for r in csv.DictReader(f) if r["state"] == "finished"]
    assert rows, f"{RUNS}: no finished run"
    return rows


@pytest.fixture(scope="module")
def doc():
    with open(DOC) as f:
        return f.read()


def values(runs, column):
    out = {}
    for r in runs:
        if r.get(column, "") != "":
            out.setdefault(r["variant"], []).append(float(r[column]))
    return out


def tables(text):
    """Every markdown table of ``text``: (header cells, rows of cells)."""
    found, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("| ---"):
            cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]  # noqa: E731
            head, body = cells(lines[i]), []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                body.append(cells(lines[i]))
                i += 1
            found.append((head, body))
        else:
            i += 1
    return found


def table_with(doc, first_cells):
    matches = [t for t in tables(doc) if t[0][:len(first_cells)] == first_cells]
    assert len(matches) == 1, f"{DOC}: expected one table starting {first_cells}, found {len(matches)}"
    return matches[0]


def cell(runs, column):
    """Per variant, the report's 'mean ± std' text of ``column`` over the seeds."""
    return {v: report.fmt(report.mean_std(xs), report._digits(column)) for v, xs in values(runs, column).items()}


def test_the_main_table_is_the_mean_and_spread_of_runs_csv(doc, runs):
    columns = {"final top-1 (%)": "final_top1", "final top-5 (%)": "final_top5", "final val loss": "final_loss",
               "S": "sparsity", "M": "multimodality", "train time (min)": "train_min"}
    head, body = table_with(doc, ["variant", "final top-1 (%)"])
    assert {row[0] for row in body} == {r["variant"] for r in runs}
    for title, column in columns.items():
        expected = cell(runs, column)
        for row in body:
            assert row[head.index(title)] == expected[row[0]], (row[0], title)


@pytest.mark.parametrize("stat, first", [("sparsity", "S per attention layer:"),
                                         ("multimodality", "M per attention layer:")])
def test_the_per_layer_tables_are_runs_csvs(doc, runs, stat, first):
    head, body = tables(doc.split(first, 1)[1])[0]
    assert len(head) > 1 and head[0] == "variant"
    for layer in head[1:]:
        expected = cell(runs, f"{stat}[{layer}]")
        for row in body:
            assert row[head.index(layer)] == expected[row[0]], (row[0], layer)


def test_the_patch_similarity_table_is_runs_csvs(doc, runs):
    head, body = tables(doc.split("### Over-smoothing", 1)[1])[0]
    assert head[1:] == [f"blocks.{i}" for i in range(len(head) - 1)] and len(head) > 1
    for block in head[1:]:
        expected = cell(runs, f"patch_similarity[{block}]")
        for row in body:
            assert row[head.index(block)] == expected[row[0]], (row[0], block)


def test_final_against_best_counts_and_what_the_text_says_of_them(doc, runs):
    head, body = table_with(doc, ["variant", "top-1 (%)", "top-5 (%)", "val loss"])
    totals = {}
    for row in body:
        mine = [r for r in runs if r["variant"] == row[0]]
        counts = report.final_is_best({m: [(float(r[f"final_{m}"]), float(r[f"best_{m}"])) for r in mine]
                                       for m in ("top1", "top5", "loss")})
        assert row[1:] == [f"{counts[m][0]} of {counts[m][1]}" for m in ("top1", "top5", "loss")], row[0]
        for m, (hits, n) in counts.items():
            totals[m] = (totals.get(m, (0, 0))[0] + hits, totals.get(m, (0, 0))[1] + n)
    everywhere = totals["top1"][0] == totals["top1"][1] == totals["loss"][0] == totals["loss"][1] == len(runs)
    claim = f"in all {len(runs)} runs the final epoch had the best top-1 and the lowest val loss"
    assert (claim in " ".join(doc.split())) == everywhere


def test_the_pairs_beyond_the_spread_are_those_of_runs_csv(doc, runs):
    head, body = table_with(doc, ["metric", "higher", "its seeds", "lower", "its seeds"])
    listed = ["| " + " | ".join(row) + " |" for row in body]
    columns = [*report.SEPARATED, *sorted(c for c in runs[0] if c.startswith("patch_similarity["))]
    computed = {c: report.pair_rows(c, values(runs, c)) for c in columns}
    every = {row for rows in computed.values() for row in rows}
    assert set(listed) <= every, sorted(set(listed) - every)
    for column in ("final_top1", "final_top5", "final_loss"):  # the doc lists these completely
        assert set(computed[column]) <= set(listed), column
    top1 = len(computed["final_top1"])
    assert f"{WORDS[top1].capitalize()} top-1 pairs exceed the spread" in " ".join(doc.split())


def test_a_wrong_number_in_the_doc_fails_these_checks(doc, runs):
    """The checks above can fail: one changed digit in the main table is caught."""
    head, body = table_with(doc, ["variant", "final top-1 (%)"])
    row = "| " + " | ".join(body[0]) + " |"
    broken = doc.replace(row, row.replace(body[0][1], "1" + body[0][1], 1))
    with pytest.raises(AssertionError):
        test_the_main_table_is_the_mean_and_spread_of_runs_csv(broken, runs)
    assert re.search(r"\d", body[0][1])


def test_every_decimal_number_of_the_reading_is_computed_from_runs_csv_once(doc, runs):
    """Each decimal number in the Reading is a mean, standard deviation, minimum or maximum over one
    variant's seeds, or a difference of two variants' means, rounded once (to the report's digits or
    to 2) from the per-run values: no number comes from rounding an already rounded one."""
    columns = [c for c in runs[0] if c not in ("variant", "seed", "state", "epochs_done", "epochs", "run_dir")]
    allowed = set()
    for column in columns:
        per_variant = values(runs, column)
        means = {v: statistics.fmean(xs) for v, xs in per_variant.items()}
        numbers = [f(xs) for xs in per_variant.values() for f in (statistics.fmean, min, max)]
        numbers += [statistics.stdev(xs) for xs in per_variant.values() if len(xs) > 1]
        numbers += [abs(means[a] - means[b]) for a in means for b in means if a != b]
        for digits in {report._digits(column), 2}:
            allowed |= {f"{x:.{digits}f}" for x in numbers}
    reading = doc.split("### Reading", 1)[1]
    found = re.findall(r"(?<![\d.])\d+\.\d+(?![\d.]|-entmax)", reading)  # 1.5-entmax is a name
    assert found and not [x for x in found if x not in allowed], [x for x in found if x not in allowed]
