"""The report of one run (eval.json, eval.md, eval.png in its folder) and the comparison of several (the same three
files in a folder of their own). Every file is written under a temporary name and renamed, so a reader never sees
half of one."""

from __future__ import annotations

from pathlib import Path

from qmor.eval import plot
from qmor.files import atomic_dir, save_json, save_text
from qmor.training.run_dir import RunDir

JSON, MARKDOWN, PLOT = "eval.json", "eval.md", "eval.png"


def write_run(run: RunDir, report: dict) -> list[Path]:
    files = [run.path / JSON, run.path / MARKDOWN, run.path / PLOT]
    save_json(report, files[0])
    save_text(markdown(report), files[1])
    plot.run(report, files[2])
    return files


def write_comparison(folder: Path, reports: list[dict]) -> Path:
    with atomic_dir(folder) as tmp:
        save_json({"runs": reports}, tmp / JSON)
        save_text(comparison(reports) + "\n", tmp / MARKDOWN)
        plot.comparison(reports, tmp / PLOT)
    return folder


def pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def cell(text: str) -> str:
    """Text fit for one table cell: one line, pipes escaped, long replies cut."""
    one = " ".join(text.split()).replace("|", "\\|")
    return one if len(one) <= 160 else one[:157] + "…"


def summary(r: dict) -> list[str]:
    """The figures of one run in a few lines (the terminal shows these)."""
    lines = []
    if r["loss"]:
        b, a = r["loss"]["base"], r["loss"]["adapter"]
        lines.append(f"loss on {r['data']['split']} ({r['data']['examples']} examples): base {b['loss']:.3f} "
                     f"(perplexity {b['perplexity']:.3g}), adapter {a['loss']:.3f} (perplexity {a['perplexity']:.3g})")
    if r["answers"]:
        b, a = r["answers"]["base"], r["answers"]["adapter"]
        lines.append(f"answers ({r['answers']['n']}): exact match base {pct(b['exact_match'])}, adapter "
                     f"{pct(a['exact_match'])}; character accuracy base {pct(b['char_accuracy'])}, adapter "
                     f"{pct(a['char_accuracy'])}")
    g = r["general"]
    if g:
        lost = f", lost: {'; '.join(g['lost'])}" if g["lost"] else ""
        lines.append(f"general questions: the adapter answers {g['kept']} of the {g['base_correct']} the base answers "
                     f"({g['adapter_correct']} of {g['n']} in all){lost}")
    for e in r["exports"]:
        verdict = "ok" if e["ok"] else "PROBLEM: " + "; ".join(e["problems"])
        lines.append(f"export {e['name']} ({e['kind']}): top-1 agreement {e['top1']:.1%}, KL {e['kl_mean']:.3g}, "
                     f"stops with the adapter on {e['stopped_with_adapter']} of {e['adapter_stopped']} replies; "
                     f"{verdict}")
    return lines + [f"note: {n}" for n in r["notes"]]


def markdown(r: dict) -> str:
    a = r["adapter"]
    out = [f"# Evaluation of {Path(r['run']).name}", "",
           f"{a['family']} r={a['rank']} ({a['init']} init) on {a['base_model']}; replies end with "
           f"`{r['end_of_turn']}`; qmor {r['qmor_version']}, {r['seconds']:.0f} s.", ""]
    if r["data"]:
        d = r["data"]
        out += [f"Data: `{d['source']}`, {d['split']} ({d['examples']} examples, {d['answers']} with a reference "
                "reply).", ""]
    if r["loss"]:
        out += ["## Loss", "", "| model | loss | perplexity |", "|---|---|---|"]
        out += [f"| {k} | {r['loss'][k]['loss']:.4f} | {r['loss'][k]['perplexity']:.4g} |" for k in ("base", "adapter")]
        out.append("")
    if r["answers"]:
        ans = r["answers"]
        out += [f"## Answers ({ans['n']} greedy replies against the reference)", "",
                "| model | exact match | character accuracy |", "|---|---|---|"]
        out += [f"| {k} | {pct(ans[k]['exact_match'])} | {pct(ans[k]['char_accuracy'])} |" for k in ("base", "adapter")]
        out += ["", "| prompt | reference | base | adapter |", "|---|---|---|---|"]
        out += [f"| {cell(i['prompt'])} | {cell(i['reference'])} | {cell(i['base'])} | {cell(i['adapter'])} |"
                for i in ans["items"][:10]]
        out.append("")
    g = r["general"]
    if g:
        out += ["## General questions (forgetting)", "",
                f"The base answers {g['base_correct']} of {g['n']}; the adapter {g['adapter_correct']}. Kept "
                f"{g['kept']} of the base's {g['base_correct']}, lost {len(g['lost'])}, gained {len(g['gained'])}.",
                ""]
        out += [f"- lost: {q}" for q in g["lost"]] + [f"- gained: {q}" for q in g["gained"]]
        if g["lost"] or g["gained"]:
            out.append("")
    if r["exports"]:
        # the token is named above the table: its pipes would split a cell
        out += ["## Exports against the adapter", "", f"The adapter's replies end with `{r['end_of_turn']}`.", "",
                "| export | kind | top-1 agreement | KL (nats/token) | stops on it | same chat template | stopped with "
                "the adapter | verdict |", "|---|---|---|---|---|---|---|---|"]
        for e in r["exports"]:
            out.append(f"| {e['name']} | {e['kind']} | {e['top1']:.1%} | {e['kl_mean']:.3g} | "
                       f"{'yes' if e['stops_on_end_of_turn'] else '**no**'} | "
                       f"{'yes' if e['template_same'] else '**no**'} | {e['stopped_with_adapter']} of "
                       f"{e['adapter_stopped']} | {'ok' if e['ok'] else '**flagged**'} |")
        out.append("")
        out += [f"- {e['name']}: {p}" for e in r["exports"] for p in e["problems"]]
        if any(e["problems"] for e in r["exports"]):
            out.append("")
    if r["side_by_side"]:
        out += ["## Side by side (greedy)", ""]
        for s in r["side_by_side"]:
            out += [f"**{cell(s['prompt'])}**", "", f"- base: {cell(s['base'])}", f"- adapter: {cell(s['adapter'])}"]
            out += [f"- {name}: {cell(text)}" for name, text in s["exports"].items()]
            out.append("")
    out += [f"Note: {n}" for n in r["notes"]]
    return "\n".join(out).rstrip() + "\n"


def comparison(reports: list[dict]) -> str:
    """One row per run: the figures that tell runs apart."""
    rows = ["| run | family | loss base → adapter | exact match | character accuracy | general kept | exports ok |",
            "|---|---|---|---|---|---|---|"]
    for r in reports:
        loss = f"{r['loss']['base']['loss']:.3f} → {r['loss']['adapter']['loss']:.3f}" if r["loss"] else "–"
        ans = r["answers"]
        em = f"{pct(ans['base']['exact_match'])} → {pct(ans['adapter']['exact_match'])}" if ans else "–"
        ca = f"{pct(ans['base']['char_accuracy'])} → {pct(ans['adapter']['char_accuracy'])}" if ans else "–"
        g = r["general"]
        kept = f"{g['kept']} of {g['base_correct']}" if g else "–"
        ok = f"{sum(e['ok'] for e in r['exports'])} of {len(r['exports'])}" if r["exports"] else "–"
        rows.append(f"| {Path(r['run']).name} | {r['adapter']['family']} r={r['adapter']['rank']} | {loss} | {em} | "
                    f"{ca} | {kept} | {ok} |")
    return "\n".join(rows)
