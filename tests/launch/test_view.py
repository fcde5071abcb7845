"""The tree viewer: records from a run's files, the page escaped against its own text, the launcher's errors, and
the page as headless Chromium renders it (nodes, the chosen path, folding, search, a screenshot that is not blank).

The runs are made here: trees written by the library's own `Result.to_json`, so the files have the keys
launch.solve writes. The last test also reads a few files of a real run when runs/ has one (runs/ is not in git).
"""

import dataclasses
import html.parser
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from o1jax import thoughts, view
from o1jax.search import result as result_lib
from o1jax.search import tree as tree_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHROMIUM = "/usr/bin/chromium"
_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")

# Problem 0: the root with two children; the answer three steps down the first, so the chosen path is 0 1 3 4.
#   0 question
#   +- 1 <script>...      (depth 1)
#   |  +- 3 & step        (depth 2)
#   |     +- 4 conclusion (depth 3, the answer)
#   +- 2 </script>...     (depth 1)
#      +- 5               (depth 2, a leaf)
SCRIPT_STEP = "<script>alert('x')</script> First step."
CLOSE_STEP = "A step that says </script><b>bold</b> in the middle."
TREE_0 = dict(
    parents=[-1, 0, 0, 1, 3, 2],
    metas=["<problem>", "<expansion>", "<critic>", "<refine>", "<conclusion>", "<expansion>"],
    texts=["How much is 2 + 2?", SCRIPT_STEP, CLOSE_STEP, "Fish & chips: 2 + 2 = 4.", "So the answer is \\boxed{4}.",
           "Step five."],
    answer_node=4, answer="4")
PATH_0 = [0, 1, 3, 4]
# Problem 1: a chain of two steps, its answer right.
TREE_1 = dict(parents=[-1, 0, 1], metas=["<problem>", "<expansion>", "<conclusion>"],
              texts=["What is 3 * 3?", "3 * 3 = 9.", "The answer is \\boxed{9}."], answer_node=2, answer="9")


def tree_json(parents, metas, texts, answer_node, answer, strategy="mcts"):
  """A tree file's JSON as launch.solve writes it (Result.to_json), for a tree of the given shape."""
  n = len(parents)
  t = tree_lib.empty(1, n + 2, 3, 4)  # spare slots, as a real tree has
  a = {name: np.array(getattr(t, name)) for name in ("parent", "depth", "meta", "children", "num_children",
                                                      "rating", "value", "visits", "terminal")}
  for i, parent in enumerate(parents):
    a["parent"][0, i] = parent
    a["meta"][0, i] = thoughts.meta_index(metas[i])
    if parent >= 0:
      a["depth"][0, i] = a["depth"][0, parent] + 1
      a["children"][0, parent, a["num_children"][0, parent]] = i
      a["num_children"][0, parent] += 1
      a["rating"][0, i] = a["value"][0, i] = -0.1 * i
      a["visits"][0, i] = n - i
    a["terminal"][0, i] = metas[i] == "<conclusion>"
  tree = dataclasses.replace(t, **a, num_nodes=np.array([n], np.int32))
  answers = [answer if i == answer_node else None for i in range(n)]
  result = result_lib.Result(problem=result_lib.Problem(id=f"test/{texts[0][:4]}", question=texts[0]),
                             strategy=strategy, tree=tree, texts=texts, answers=answers, answer=answer,
                             answer_node=answer_node, usage=result_lib.Usage(generated=10 * n), rounds=2)
  return result.to_json()


@pytest.fixture
def workdir(tmp_path):
  """A search run's workdir: results.jsonl (problem 0 wrong, problem 1 right) and trees/0.json, trees/1.json."""
  os.makedirs(tmp_path / "trees")
  rows = []
  for index, (spec, gold) in enumerate([(TREE_0, "5"), (TREE_1, "9")]):
    record = tree_json(**spec)
    with open(tmp_path / "trees" / f"{index}.json", "w") as f:
      json.dump(record, f)
    rows.append(dict(index=index, uid=record["problem"], question=spec["texts"][0], gold=gold,
                     answer=spec["answer"], correct=spec["answer"] == gold, nodes=len(spec["parents"]) - 1,
                     tokens=record["tokens_generated"], strategy="mcts"))
  with open(tmp_path / "results.jsonl", "w") as f:
    f.write("".join(json.dumps(row) + "\n" for row in rows))
  return tmp_path


# ------------------------------------------------------------------------------------------------ the library


def test_load_reads_every_tree_with_its_correctness(workdir):
  records = view.load(str(workdir / "trees"))
  assert [r["index"] for r in records] == [0, 1]
  assert [r["correct"] for r in records] == [False, True]
  assert [r["gold"] for r in records] == ["5", "9"]
  assert [len(r["nodes"]) for r in records] == [6, 3]
  assert records[0]["path"] == PATH_0 and records[1]["path"] == [0, 1, 2]
  nodes = records[0]["nodes"]
  assert [n["parent"] for n in nodes] == TREE_0["parents"]
  assert [n["depth"] for n in nodes] == [0, 1, 1, 2, 3, 2]
  assert nodes[0]["children"] == [1, 2] and nodes[3]["children"] == [4] and nodes[5]["children"] == []
  assert nodes[4]["terminal"] and nodes[4]["answer"] == "4" and nodes[4]["meta_action"] == "<conclusion>"
  assert nodes[1]["text"] == SCRIPT_STEP and nodes[2]["visits"] == 4
  assert nodes[3]["rating"] == pytest.approx(-0.3) and "prior" not in nodes[3]  # the file has no prior
  assert "tokens" not in nodes[1] and "log_probs" not in nodes[1]


def test_path_without_a_recorded_one_is_walked_up_from_the_answer_node():
  record = tree_json(**TREE_0)
  del record["answer_path"]
  assert view.answer_path(record) == PATH_0
  assert view.answer_path({**record, "answer_node": -1}) == []


def test_without_results_jsonl_correctness_is_unknown(workdir):
  os.remove(workdir / "results.jsonl")
  records = view.load(str(workdir / "trees"))
  assert [r["correct"] for r in records] == [None, None] and records[0]["question"] == TREE_0["texts"][0]


class _Scripts(html.parser.HTMLParser):
  """The <script> blocks of a page: [(attributes, text)], as a browser's tokenizer splits them."""

  def __init__(self):
    super().__init__()
    self.blocks, self._open = [], None

  def handle_starttag(self, tag, attrs):
    if tag == "script":
      self._open = (dict(attrs), [])

  def handle_data(self, data):
    if self._open is not None:
      self._open[1].append(data)

  def handle_endtag(self, tag):
    if tag == "script" and self._open is not None:
      self.blocks.append((self._open[0], "".join(self._open[1])))
      self._open = None


def test_render_embeds_the_records_so_no_text_breaks_out(workdir):
  records = view.load(str(workdir / "trees"))
  page = view.render(records, title="run <1>")
  assert page.count("<script") == 2 and page.count("</script>") == 2  # the page's own two, none from the text
  assert "<b>bold" not in page and "alert('x')" in page  # the text is there, escaped
  assert "<title>run &lt;1&gt;</title>" in page
  assert "http://" not in page and "https://" not in page and " src=" not in page  # nothing to fetch
  parser = _Scripts()
  parser.feed(page)
  (data_attrs, data), (code_attrs, _) = parser.blocks
  assert data_attrs == {"type": "application/json", "id": "o1jax-trees"} and code_attrs == {}
  assert json.loads(data) == {"title": "run <1>", "problems": records}


@pytest.mark.parametrize("setup, message", [
    (lambda w: shutil.rmtree(w / "trees"), "does not exist"),
    (lambda w: [os.remove(w / "trees" / f) for f in os.listdir(w / "trees")], "has no <index>.json"),
    (lambda w: (w / "trees" / "1.json").write_text('{"nodes": ['), "1.json' is not JSON"),
    (lambda w: (w / "trees" / "1.json").write_text('{"answer": 1}'), "1.json has no list of nodes"),
    (lambda w: (w / "trees" / "1.json").write_text('{"nodes": [{"index": 0, "parent": -1, "children": [0]}]}'),
     "1.json node 0 needs"),
    (lambda w: (w / "results.jsonl").write_text("{}\n"), "results.jsonl line 1"),
])
def test_bad_run_files_are_one_sentence_naming_the_file(workdir, setup, message):
  setup(workdir)
  with pytest.raises((ValueError, FileNotFoundError)) as e:
    view.load(str(workdir / "trees"))
  assert message in str(e.value) and str(e.value).endswith(".")


# ---------------------------------------------------------------------------------------------- the launcher


def _launch(*args):
  return subprocess.run([sys.executable, "-m", "launch.view", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)


def test_launcher_writes_the_page(workdir):
  out = workdir / "page.html"
  done = _launch(f"--trees={workdir / 'trees'}", f"--out={out}")
  assert done.returncode == 0, done.stderr
  assert out.read_text() == view.render(view.load(str(workdir / "trees")), title=workdir.name)
  assert "2 trees, 1 correct" in done.stdout


@pytest.mark.parametrize("setup, out, message", [
    (lambda w: shutil.rmtree(w / "trees"), "page.html", "does not exist"),
    (lambda w: (w / "trees" / "0.json").write_text("not json"), "page.html", "0.json' is not JSON"),
    (lambda w: None, ".", "is a directory"),
])
def test_launcher_bad_input_is_one_error_line(workdir, setup, out, message):
  setup(workdir)
  done = _launch(f"--trees={workdir / 'trees'}", f"--out={workdir / out}")
  lines = [line for line in done.stderr.splitlines() if line.strip() and not _LOG_LINE.match(line)]
  assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr


# ------------------------------------------------------------------------------------------ headless Chromium


@pytest.fixture
def chromium(tmp_path):
  """Runs headless Chromium with its own profile: chromium(*args, url) -> stdout."""
  if not os.path.exists(CHROMIUM):
    pytest.fail(f"{CHROMIUM} is missing: these tests render the page in headless Chromium; install it with "
                "`apt-get install -y chromium` (Debian).")
  profile = tmp_path / "chromium-profile"

  def run(*args):
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                           "--virtual-time-budget=5000", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout
  return run


@dataclasses.dataclass
class Rendered:
  """What the page's script built: its tree nodes and problem list, from a DOM dump."""

  nodes: dict[int, dict]    # node id -> {"depth", "classes", "hidden" (inside a folded ul), "text"}
  problems: dict[str, str]  # data-problem -> data-correct
  matches: str | None       # the tree section's data-matches


class _Dom(html.parser.HTMLParser):
  VOID = {"meta", "input", "br", "img", "hr", "link"}

  def __init__(self):
    super().__init__()
    self.stack, self.rendered, self._text_of = [], Rendered({}, {}, None), None

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    hidden = "hidden" in attrs or bool(self.stack and self.stack[-1][1])
    classes = set((attrs.get("class") or "").split())
    if tag == "li" and "node" in classes:
      self.rendered.nodes[int(attrs["data-node-id"])] = dict(depth=int(attrs["data-depth"]), classes=classes,
                                                             hidden=hidden, text="")
    if tag == "li" and "problem" in classes:
      self.rendered.problems[attrs["data-problem"]] = attrs["data-correct"]
    if tag == "section" and attrs.get("id") == "tree":
      self.rendered.matches = attrs.get("data-matches")
    if tag == "div" and "text" in classes:
      self._text_of = next(reversed(self.rendered.nodes))  # the node opened last (pre-order)
    if tag not in self.VOID:
      self.stack.append((tag, hidden))

  def handle_endtag(self, tag):
    if tag not in self.VOID:
      self.stack.pop()
    if tag == "div":
      self._text_of = None

  def handle_data(self, data):
    if self._text_of is not None:
      self.rendered.nodes[self._text_of]["text"] += data


def dump(chromium, page, fragment):
  dom = chromium("--dump-dom", f"file://{page}#{fragment}")
  parser = _Dom()
  parser.feed(dom)
  return parser.rendered, dom


def test_chromium_renders_every_node_the_path_and_the_list(workdir, chromium):
  page = workdir / "page.html"
  records = view.load(str(workdir / "trees"))
  page.write_text(view.render(records))
  for record in records:
    rendered, dom = dump(chromium, page, f"problem={record['index']}")
    assert sorted(rendered.nodes) == list(range(len(record["nodes"])))
    assert [i for i in sorted(rendered.nodes) if "on-path" in rendered.nodes[i]["classes"]] == record["path"]
    assert [i for i, n in rendered.nodes.items() if "answer" in n["classes"]] == [record["answer_node"]]
    assert [n["depth"] for _, n in sorted(rendered.nodes.items())] == [n["depth"] for n in record["nodes"]]
    assert not any("collapsed" in n["classes"] or n["hidden"] for n in rendered.nodes.values())
    assert rendered.problems == {"0": "false", "1": "true"}
  rendered, dom = dump(chromium, page, "problem=0")
  assert rendered.nodes[1]["text"] == SCRIPT_STEP and rendered.nodes[2]["text"] == CLOSE_STEP  # text, not markup
  assert dom.count("<script") == 2 and "<b>" not in dom


def test_chromium_folds_from_the_fragment_and_search_unfolds(workdir, chromium):
  page = workdir / "page.html"
  page.write_text(view.render(view.load(str(workdir / "trees"))))
  rendered, _ = dump(chromium, page, "problem=0&collapse=2")
  # Depth >= 2 folded: node 3 (the only one there with children) is collapsed, its child 4 hidden.
  assert {i for i, n in rendered.nodes.items() if "collapsed" in n["classes"]} == {3}
  assert {i for i, n in rendered.nodes.items() if n["hidden"]} == {4}
  rendered, _ = dump(chromium, page, "problem=0&collapse=1")
  assert {i for i, n in rendered.nodes.items() if "collapsed" in n["classes"]} == {1, 2, 3}
  assert {i for i, n in rendered.nodes.items() if n["hidden"]} == {3, 4, 5}
  # A search hit inside the folds opens every fold above it, and only those.
  rendered, _ = dump(chromium, page, "problem=0&collapse=1&q=ANSWER is")
  assert {i for i, n in rendered.nodes.items() if "match" in n["classes"]} == {4} and rendered.matches == "1"
  assert {i for i, n in rendered.nodes.items() if n["hidden"]} == {5}


def png_rows(path):
  """(width, height, the distinct filtered scanlines) of an 8-bit PNG, decoded with zlib and struct."""
  data = open(path, "rb").read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
  at, idat, header = 8, b"", None
  while at < len(data):
    length, kind = struct.unpack(">I4s", data[at:at + 8])
    body = data[at + 8:at + 8 + length]
    if kind == b"IHDR":
      header = struct.unpack(">IIBBBBB", body)
    elif kind == b"IDAT":
      idat += body
    at += 12 + length
  width, height, bit_depth, color_type = header[:4]
  channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
  raw = zlib.decompress(idat)
  stride = 1 + width * channels * bit_depth // 8
  assert len(raw) == stride * height
  return width, height, {raw[r * stride:(r + 1) * stride] for r in range(height)}


def test_chromium_screenshot_is_not_blank(workdir, chromium, tmp_path):
  page = workdir / "page.html"
  page.write_text(view.render(view.load(str(workdir / "trees"))))
  shot = tmp_path / "shot.png"
  chromium(f"--screenshot={shot}", "--window-size=1200,900", f"file://{page}#problem=0")
  width, height, rows = png_rows(shot)
  # A blank page is one scanline repeated (whatever the filter); rows of text, bars and badges differ.
  assert (width, height) == (1200, 900) and len(rows) > 100, len(rows)


# ------------------------------------------------------------------------------------------------ --png


def test_layout_puts_leaves_in_order_and_parents_above_their_children(workdir):
  record = view.load(str(workdir / "trees"))[0]   # 0 -> (1 -> 3 -> 4), (2 -> 5)
  assert view.layout(record) == {4: (0, 3), 3: (0, 2), 1: (0, 1), 5: (1, 2), 2: (1, 1), 0: (0.5, 0)}


def test_launcher_draws_one_tree_as_a_png(workdir):
  out = workdir / "tree.png"
  done = _launch(f"--trees={workdir / 'trees'}", "--png=0", f"--out={out}")
  assert done.returncode == 0, done.stderr
  assert "problem 0's tree, 6 nodes" in done.stdout
  width, height, rows = png_rows(out)
  assert width >= 400 and height >= 300 and len(rows) > 20   # drawn, not blank
  done = _launch(f"--trees={workdir / 'trees'}", "--png=7", f"--out={out}")
  lines = [line for line in done.stderr.splitlines() if line.strip() and not _LOG_LINE.match(line)]
  assert done.returncode == 2 and lines == [f"error: --png=7 names no tree in {workdir / 'trees'}; it holds "
                                            "problems [0, 1]."], done.stderr
