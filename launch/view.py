"""The trees of a search run as one HTML page to browse (no network: inline style, script and data):

  python -m launch.view --trees=runs/x/trees --out=runs/x/trees.html
  python -m launch.view --trees=runs/x/trees --png=3 --out=runs/x/tree_3.png     # one tree as a picture

Reads every trees/<index>.json that launch.solve wrote and the results.jsonl beside the trees directory (the
correctness of each problem); o1jax/view.py builds the page. A missing trees directory, a tree file that is not
JSON or an --out that is a directory gets one line on stderr and exit status 2 (launch/app.py).
"""

from __future__ import annotations

import os

from absl import flags

from launch import app
from o1jax import view

_TREES = flags.DEFINE_string("trees", None, "A search run's trees directory ({workdir}/trees).", required=True)
_OUT = flags.DEFINE_string("out", None, "The HTML file to write (None: trees.html beside the trees directory).")
_TITLE = flags.DEFINE_string("title", None, "The page title (None: the workdir's name).")
_PNG = flags.DEFINE_integer("png", None, "Draw this problem's tree as a PNG at --out (default tree_<index>.png "
                            "beside the trees directory) instead of writing the page.")


def main(argv):
  del argv
  workdir = os.path.dirname(os.path.abspath(_TREES.value))
  default = "trees.html" if _PNG.value is None else f"tree_{_PNG.value}.png"
  out = _OUT.value or os.path.join(workdir, default)
  if os.path.isdir(out):
    app.fail(f"--out={out} is a directory; expected the path of the HTML file to write.")
  if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
    app.fail(f"--out={out} is in a directory that does not exist; expected a path in an existing directory.")
  with app.user_errors():
    records = view.load(_TREES.value)
    if _PNG.value is not None:
      chosen = [r for r in records if r["index"] == _PNG.value]
      if not chosen:
        raise ValueError(f"--png={_PNG.value} names no tree in {_TREES.value}; it holds problems "
                         f"{[r['index'] for r in records][:20]}.")
  if _PNG.value is not None:
    view.draw_png(chosen[0], out)
    print(f"{out}: problem {_PNG.value}'s tree, {len(chosen[0]['nodes'])} nodes")
    return
  page = view.render(records, title=_TITLE.value or os.path.basename(workdir))
  with open(out, "w") as f:
    f.write(page)
  print(f"{out}: {len(records)} trees, {sum(r['correct'] is True for r in records)} correct")


if __name__ == "__main__":
  app.run(main)
