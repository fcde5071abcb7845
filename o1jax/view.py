"""One self-contained HTML page to browse the trees of a search run (what `python -m launch.view` writes).

  records = view.load("runs/x/trees")          # every trees/<index>.json, with its row of results.jsonl
  page = view.render(records)                  # inline style and script: no network, one file

A record is one problem: its results row's fields (index, uid, question, gold, answer, correct, strategy), the
answer node and the chosen path, and its nodes in id order with the fields a reader looks at (the step tokens and
their log-probs are left out: they are what makes a tree file large). The chosen path is the one the search
recorded (`Result.answer_path`: root to the answer node); a tree file without it gets the same path walked up
the parents from its `answer_node`.

The page's script builds the tree from the embedded JSON into DOM elements (`li.node` with `data-node-id` and
`data-depth`, class `on-path` on the chosen path, `collapsed` on a folded node whose `ul.children` is hidden), so
a headless browser's DOM dump shows what a reader sees. Its URL fragment selects what a static dump shows:
`#problem=<index>` the problem, `collapse=<depth>` folds every node at that depth or deeper, `q=<text>` the
search. Node text reaches the DOM through `textContent` only, and the JSON block has every `<`, `>` and `&`
written as a \\u escape, so no text (a step that says `</script>`) can end the block or become markup.
"""

from __future__ import annotations

import html
import json
import os
import re
from typing import Any, Sequence

# Node fields the page shows, copied from a tree file when present. The tree JSON has no prior: a node's
# `rating` (log p(<positive_rating>) when it was created) and `step_log_prob` (its step's mean token
# log-prob) are what the search scored it with.
NODE_FIELDS = ("depth", "meta_action", "text", "value", "visits", "prior", "rating", "step_log_prob", "rectified",
               "terminal", "finished", "outcome_name", "answer")
# results.jsonl fields a problem record takes (its row wins over the tree file for the same name).
RESULT_FIELDS = ("uid", "question", "gold", "answer", "correct", "strategy", "tokens")

_TREE_FILE = re.compile(r"^(\d+)\.json$")


def load(trees_dir: str) -> list[dict[str, Any]]:
  """The problem records of a run's trees directory, in index order; correctness from results.jsonl beside it.

  A missing results.jsonl leaves `correct` None (unknown), it is not guessed from the tree.
  """
  if not os.path.exists(trees_dir):
    raise FileNotFoundError(f"trees directory {trees_dir!r} does not exist; expected the trees/ folder of a "
                            "launch.solve workdir.")
  if not os.path.isdir(trees_dir):
    raise NotADirectoryError(f"{trees_dir!r} is not a directory; expected the trees/ folder of a launch.solve "
                             "workdir.")
  indices = sorted(int(m.group(1)) for m in map(_TREE_FILE.match, os.listdir(trees_dir)) if m)
  if not indices:
    raise ValueError(f"trees directory {trees_dir!r} has no <index>.json tree files; expected the trees/ folder "
                     "of a launch.solve workdir.")
  rows = read_results(os.path.join(os.path.dirname(os.path.abspath(trees_dir)), "results.jsonl"))
  records = []
  for index in indices:
    path = os.path.join(trees_dir, f"{index}.json")
    with open(path) as f:
      try:
        tree = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"tree file {path!r} is not JSON ({e.msg} at line {e.lineno}); expected a tree written "
                         "by launch.solve.") from None
    records.append(problem_record(index, tree, rows.get(index), source=path))
  return records


def read_results(path: str) -> dict[int, dict[str, Any]]:
  """results.jsonl as {index: row} ({} when the file does not exist)."""
  if not os.path.exists(path):
    return {}
  rows = {}
  with open(path) as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        rows[int(row["index"])] = row
      except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ValueError(f"{path} line {number} is not a JSON object with an index; expected one line per "
                         "problem as launch.solve writes it.") from None
  return rows


def problem_record(index: int, tree: Any, row: dict[str, Any] | None = None, *,
                   source: str = "the tree") -> dict[str, Any]:
  """One problem's record from its tree file's JSON (`Result.to_json`) and its results row (None: no row)."""
  nodes = tree.get("nodes") if isinstance(tree, dict) else None
  if not isinstance(nodes, list) or not nodes or not all(isinstance(n, dict) for n in nodes):
    raise ValueError(f"{source} has no list of nodes; expected a tree written by launch.solve (Result.to_json).")
  for i, node in enumerate(nodes):
    children = node.get("children")
    if (node.get("index") != i or not isinstance(node.get("parent"), int) or not isinstance(children, list)
        or not all(isinstance(c, int) and i < c < len(nodes) for c in children)):
      raise ValueError(f"{source} node {i} needs index {i}, a parent and children among the later nodes; "
                       f"got {_brief(node)}.")
  record = {"index": index, "uid": tree.get("problem"), "question": tree.get("question", nodes[0].get("text")),
            "gold": None, "answer": tree.get("answer"), "correct": None, "strategy": tree.get("strategy")}
  record.update({key: row[key] for key in RESULT_FIELDS if row and key in row})
  record["answer_node"] = int(tree.get("answer_node", -1))
  record["path"] = answer_path(tree, source=source)
  record["nodes"] = [{"id": i, "parent": node["parent"], "children": node["children"],
                      **{key: node[key] for key in NODE_FIELDS if key in node}} for i, node in enumerate(nodes)]
  return record


def answer_path(tree: dict[str, Any], *, source: str = "the tree") -> list[int]:
  """Node ids from the root to the chosen answer node ([] when the search chose none).

  The recorded `answer_path` when the file has it; otherwise the parents walked up from `answer_node`, the rule
  `Result.answer_path` records it by.
  """
  nodes = tree["nodes"]
  if "answer_path" in tree:
    path = tree["answer_path"]
    if not (isinstance(path, list) and all(isinstance(i, int) and 0 <= i < len(nodes) for i in path)):
      raise ValueError(f"{source} has answer_path {_brief(path)}; expected a list of node ids.")
    return list(path)
  node = int(tree.get("answer_node", -1))
  if node >= len(nodes):
    raise ValueError(f"{source} has answer_node {node} but {len(nodes)} nodes; expected a node id or -1.")
  path = []
  while node >= 0:  # ids only decrease towards the root (a parent is older than its children): this ends
    path.append(node)
    parent = nodes[node]["parent"]
    node = parent if parent < node else -1
  return path[::-1]


def render(records: Sequence[dict[str, Any]], title: str = "o1jax trees") -> str:
  """The HTML page browsing `records` (from `load`), as one string: inline style, script and data."""
  data = json.dumps({"title": title, "problems": list(records)}, ensure_ascii=False)
  # Inside <script> only `</script` (or `<!--`) ends the block; with no `<` left nothing can. The \u escapes
  # are the same characters to JSON.parse.
  data = data.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
  return _PAGE.format(title=html.escape(title), style=_STYLE, data=data, script=_SCRIPT)


def layout(record: dict[str, Any]) -> dict[int, tuple[float, int]]:
  """Node id -> (x, depth) for drawing: leaves at 0, 1, 2, ... in depth-first order, a parent above the middle of
  its children."""
  nodes = record["nodes"]
  positions: dict[int, tuple[float, int]] = {}
  next_leaf = [0.0]

  def place(i: int, depth: int) -> float:
    children = nodes[i]["children"]
    if not children:
      x, next_leaf[0] = next_leaf[0], next_leaf[0] + 1
    else:
      xs = [place(c, depth + 1) for c in children]
      x = (xs[0] + xs[-1]) / 2
    positions[i] = (x, depth)
    return x
  place(0, 0)
  return positions


def draw_png(record: dict[str, Any], path: str) -> None:
  """One tree as a picture for a paper: a node per step (labelled with its id and value), the chosen answer path
  drawn thick and red, terminal nodes as squares (values are log-space, as the tree stores them). matplotlib with its Agg backend (no screen needed)."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  positions = layout(record)
  on_path = set(record["path"])
  width = max(4.0, 0.6 * (1 + max(x for x, _ in positions.values())))
  height = max(3.0, 0.9 * (1 + max(d for _, d in positions.values())))
  fig, ax = plt.subplots(figsize=(min(width, 40.0), min(height, 20.0)), dpi=150)
  for node in record["nodes"]:
    x, d = positions[node["id"]]
    for c in node["children"]:
      cx, cd = positions[c]
      path_edge = node["id"] in on_path and c in on_path
      ax.plot([x, cx], [-d, -cd], color="#c0392b" if path_edge else "#999999", lw=2.5 if path_edge else 0.8,
              zorder=1)
  for node in record["nodes"]:
    x, d = positions[node["id"]]
    value = node.get("value")
    label = f"{node['id']}" + (f"\n{value:.2f}" if isinstance(value, (int, float)) and node["id"] else "")
    ax.scatter([x], [-d], s=260, marker="s" if node.get("terminal") else "o", zorder=2,
               color="#c0392b" if node["id"] in on_path else "#5dade2", edgecolors="black", linewidths=0.5)
    ax.annotate(label, (x, -d), ha="center", va="center", fontsize=5, zorder=3)
  verdict = {True: "correct", False: "wrong", None: "not graded"}[record.get("correct")]
  ax.set_title(f"problem {record['index']}: answer {record.get('answer')!r} ({verdict}), "
               f"{len(record['nodes'])} nodes", fontsize=8)
  ax.axis("off")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def _brief(value: Any) -> str:
  text = json.dumps(value)
  return text if len(text) <= 80 else text[:77] + "..."


_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #222; background: #fff; }
header { padding: 8px 16px; background: #20324a; color: #fff; display: flex; gap: 16px; align-items: center; }
header h1 { font-size: 18px; margin: 0; }
header input { font-size: 14px; padding: 4px 8px; width: 320px; }
main { display: flex; height: calc(100vh - 48px); }
nav { width: 300px; overflow-y: auto; border-right: 1px solid #ccc; }
nav ul { list-style: none; margin: 0; padding: 0; }
nav li a { display: block; padding: 4px 8px; color: inherit; text-decoration: none; border-bottom: 1px solid #eee; }
nav li.correct a::before { content: "\\2713  "; color: #1a7f37; font-weight: bold; }
nav li.wrong a::before { content: "\\2717  "; color: #c62828; font-weight: bold; }
nav li.unknown a::before { content: "?  "; color: #888; }
nav li.selected a { background: #dbe7f7; }
nav li .matches { float: right; background: #ffe066; border-radius: 8px; padding: 0 6px; }
section { flex: 1; overflow: auto; padding: 8px 16px; }
.problem-head { border-bottom: 1px solid #ccc; margin-bottom: 8px; }
.problem-head .verdict-correct { color: #1a7f37; font-weight: bold; }
.problem-head .verdict-wrong { color: #c62828; font-weight: bold; }
ul.tree, ul.children { list-style: none; margin: 0; padding-left: 20px; border-left: 1px dotted #bbb; }
ul.tree { padding-left: 0; border-left: none; }
li.node > .row { display: flex; flex-wrap: wrap; gap: 6px; align-items: baseline; margin-top: 4px; }
li.node > .text { white-space: pre-wrap; margin: 2px 0 4px 26px; padding: 2px 6px; border-radius: 4px; }
li.on-path > .text { background: #fff4c2; border-left: 4px solid #e0a800; }
li.answer > .text { outline: 2px solid #e0a800; }
li.match > .text { background: #c8f0c8; }
.toggle { width: 20px; font-family: monospace; padding: 0; }
.meta { font-weight: bold; color: #20324a; }
.field { color: #555; font-size: 12px; }
.flag { font-size: 12px; padding: 0 6px; border-radius: 8px; background: #eee; }
.outcome-correct { background: #c8f0c8; }
.outcome-wrong { background: #f7c8c8; }
"""

_SCRIPT = r"""
"use strict";
const DATA = JSON.parse(document.getElementById("o1jax-trees").textContent);
const FIELDS = [["value", "value"], ["visits", "visits"], ["prior", "prior"], ["rating", "rating"],
                ["step_log_prob", "log-prob"], ["rectified", "rectified"]];

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function fmt(v) { return typeof v === "number" && !Number.isInteger(v) ? v.toFixed(3) : String(v); }

function verdict(p) { return p.correct === true ? "correct" : p.correct === false ? "wrong" : "unknown"; }

function setCollapsed(li, collapsed) {
  const kids = li.querySelector(":scope > ul.children");
  if (!kids) return;
  li.classList.toggle("collapsed", collapsed);
  kids.hidden = collapsed;
  li.querySelector(":scope > .row > .toggle").textContent = collapsed ? "+" : "-";
}

function renderNode(problem, id, onPath) {
  const node = problem.nodes[id];
  const li = el("li", "node");
  li.dataset.nodeId = id;
  li.dataset.depth = node.depth;
  if (onPath.has(id)) li.classList.add("on-path");
  if (id === problem.answer_node) li.classList.add("answer");
  if (node.terminal) li.classList.add("terminal");
  const row = el("div", "row");
  const toggle = el("button", "toggle", node.children.length ? "-" : "\u00b7");
  toggle.disabled = !node.children.length;
  toggle.addEventListener("click", () => setCollapsed(li, !li.classList.contains("collapsed")));
  row.append(toggle, el("span", "meta", node.meta_action), el("span", "field", "#" + id));
  // The root was never scored: its rating and log-prob hold the 0 fill, not a value.
  for (const [key, label] of FIELDS)
    if (key in node && (id !== 0 || key === "value" || key === "visits"))
      row.append(el("span", "field", label + " " + fmt(node[key])));
  if (node.terminal) row.append(el("span", "flag", "terminal"));
  if (node.outcome_name && node.outcome_name !== "unknown")
    row.append(el("span", "flag outcome-" + node.outcome_name, node.outcome_name));
  if (node.answer !== undefined && node.answer !== null) row.append(el("span", "flag", "answer " + node.answer));
  li.append(row, el("div", "text", node.text));
  if (node.children.length) {
    const ul = el("ul", "children");
    for (const child of node.children) ul.append(renderNode(problem, child, onPath));
    li.append(ul);
  }
  return li;
}

function renderProblem(problem) {
  const section = document.getElementById("tree");
  section.textContent = "";
  section.dataset.problem = problem.index;
  const head = el("div", "problem-head");
  const h2 = el("h2", null, "Problem " + problem.index + (problem.uid ? " (" + problem.uid + ")" : ""));
  const facts = el("p");
  facts.append(el("span", "verdict-" + verdict(problem), verdict(problem)),
               " \u2014 answer " + problem.answer + ", gold " + problem.gold + ", strategy " + problem.strategy +
               ", " + (problem.nodes.length - 1) + " nodes, path " + (problem.path.join(" \u2192 ") || "none"));
  head.append(h2, el("p", "question", problem.question), facts);
  const tree = el("ul", "tree");
  tree.append(renderNode(problem, 0, new Set(problem.path)));
  section.append(head, tree);
}

function renderList(selected) {
  const nav = document.getElementById("problems");
  nav.textContent = "";
  const ul = el("ul");
  for (const p of DATA.problems) {
    const li = el("li", "problem " + verdict(p));
    li.dataset.problem = p.index;
    li.dataset.correct = String(p.correct);
    if (p === selected) li.classList.add("selected");
    const a = el("a", null, p.index + ": " + String(p.question).slice(0, 70));
    a.href = "#problem=" + p.index;
    li.append(a);
    ul.append(li);
  }
  nav.append(ul);
  const right = DATA.problems.filter(p => p.correct === true).length;
  document.getElementById("summary").textContent = right + " / " + DATA.problems.length + " correct";
}

function search(query) {
  const q = query.trim().toLowerCase();
  let count = 0;
  for (const li of document.querySelectorAll("#tree li.node")) {
    const hit = q !== "" && li.querySelector(":scope > .text").textContent.toLowerCase().includes(q);
    li.classList.toggle("match", hit);
    if (!hit) continue;
    count += 1;
    for (let up = li.parentElement.closest("li.node"); up; up = up.parentElement.closest("li.node"))
      setCollapsed(up, false);
  }
  document.getElementById("tree").dataset.matches = count;
  for (const li of document.querySelectorAll("#problems li.problem")) {
    const p = DATA.problems.find(p => String(p.index) === li.dataset.problem);
    const n = q === "" ? 0 : p.nodes.filter(node => String(node.text).toLowerCase().includes(q)).length;
    const badge = li.querySelector(".matches");
    if (badge) badge.remove();
    if (n) li.firstChild.prepend(el("span", "matches", String(n)));
  }
}

function show() {
  const params = new URLSearchParams(location.hash.slice(1));
  if (!DATA.problems.length) {
    document.getElementById("tree").textContent = "No trees.";
    return;
  }
  const problem = DATA.problems.find(p => String(p.index) === params.get("problem")) || DATA.problems[0];
  renderList(problem);
  renderProblem(problem);
  if (params.has("collapse")) {
    const depth = Number(params.get("collapse"));
    for (const li of document.querySelectorAll("#tree li.node"))
      if (Number(li.dataset.depth) >= depth) setCollapsed(li, true);
  }
  const box = document.getElementById("search");
  if (params.has("q")) box.value = params.get("q");
  search(box.value);
}

document.getElementById("search").addEventListener("input", e => search(e.target.value));
window.addEventListener("hashchange", show);
show();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<header><h1>{title}</h1><input id="search" type="search" placeholder="search node text">
<span id="summary"></span></header>
<main><nav id="problems"></nav><section id="tree"></section></main>
<script type="application/json" id="o1jax-trees">{data}</script>
<script>{script}</script>
</body>
</html>
"""
