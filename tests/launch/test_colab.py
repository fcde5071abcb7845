"""launch/colab.ipynb runs top to bottom on the CPU with a tiny random model (the one environment variable the
notebook reads), and its search cell prints a tree that parsed back from the LLaMA-O1 format."""

import os
import re

import nbclient
import nbformat

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK = os.path.join(ROOT, "launch", "colab.ipynb")


def cell_text(cell) -> str:
  return "".join(o.get("text", "") + "".join(o.get("data", {}).get("text/plain", "")) for o in cell.get("outputs", []))


def test_notebook_runs_top_to_bottom_with_the_tiny_model(tiny_smollm2_checkpoint, monkeypatch):
  monkeypatch.setenv("O1JAX_NOTEBOOK_TINY_MODEL", tiny_smollm2_checkpoint)
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  assert notebook.cells[0].cell_type == "markdown" and "| step |" in notebook.cells[0].source
  # Raises CellExecutionError, with the failing cell and its traceback, when any cell fails.
  nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": ROOT}}).execute()
  outputs = [cell_text(c) for c in notebook.cells if c.cell_type == "code"]
  search = next(text for text in outputs if "problem 0's tree" in text)
  count = int(re.search(r"problem 0's tree: (\d+) nodes, parsed back", search).group(1))
  assert count >= 2 and "<start_of_thought>" in search
  assert re.search(r"\d+/2 correct", search)
  export = outputs[-1]
  assert "model.safetensors" in export and "config.json" in export and "README.md" in export
  assert "round done" in outputs[-2]
