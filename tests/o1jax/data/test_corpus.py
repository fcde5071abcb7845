"""The format corpus: steps, trees, policy and rating examples from real GSM8K problems (corrupted steps:
test_corruption.py)."""

import re

import numpy as np
import pytest

from o1jax import thoughts
from o1jax.data import corpus, corruption, problems
from o1jax.data.problems import Problem

POS, NEG, UNK = "<positive_rating>", "<negative_rating>", "<unknown_rating>"
ANNOTATION = re.compile(r"<<([^<>=]+)=([^<>=]+)>>")


@pytest.fixture(scope="module")
def gsm8k():
  return problems.load("gsm8k_train", 0, 5)


def test_split_steps_gsm8k(gsm8k):
  assert corpus.split_steps(gsm8k[0]) == [
      "Natalia sold 48/2 = <<48/2=24>>24 clips in May.",
      "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May."]
  assert len(corpus.split_steps(gsm8k[4])) == 3
  raw = Problem("gsm8k_train/x", "q", "He has 2+3=<<2+3=5>>5 apples.\n\nSo 5.\n#### 5", "5")
  assert corpus.split_steps(raw) == ["He has 2+3=<<2+3=5>>5 apples.", "So 5."]


def test_split_steps_math_keeps_math_and_braces_whole():
  solution = ("We have $x = 3.5$ and $y = 2.$  Then \\[x + y = 5.5.\\] Since $\\frac{a}{b}$ is small, the value "
              "is $\\text{a. b}$ here. Note that $p. q$ holds. Finally, the answer is $\\boxed{5.5}$.")
  steps = corpus.split_steps(Problem("math/1", "q", solution, "5.5"), min_chars=1)
  assert steps == ["We have $x = 3.5$ and $y = 2.$", "Then \\[x + y = 5.5.\\]",
                   "Since $\\frac{a}{b}$ is small, the value is $\\text{a. b}$ here.", "Note that $p. q$ holds.",
                   "Finally, the answer is $\\boxed{5.5}$."]
  merged = corpus.split_steps(Problem("math/1", "q", solution, "5.5"), max_steps=2, min_chars=1)
  assert len(merged) == 2 and merged[-1].endswith("$\\boxed{5.5}$.")


def test_split_steps_math500_at_most_eight_balanced_steps():
  for problem in problems.load("math500", 0, 20):
    steps = corpus.split_steps(problem)
    assert 1 <= len(steps) <= 8
    for step in steps:
      assert len(re.findall(r"(?<!\\)\$", step)) % 2 == 0, step  # never cut inside $...$
      assert step.count("{") == step.count("}"), step
      assert step.count("\\begin{") == step.count("\\end{"), step
    assert problem.answer in steps[-1] or "boxed" in "".join(steps)


def test_corrupt_step_is_reexported():
  # Callers and older code use corpus.corrupt_step; it is the corruption module's function.
  assert corpus.corrupt_step is corruption.corrupt_step
  rng = np.random.default_rng(0)
  assert corpus.corrupt_step("Add the two amounts together.", rng) is None
  assert corpus.corrupt_step("He has 2+3 = <<2+3=5>>5 apples.", rng) != "He has 2+3 = <<2+3=5>>5 apples."


def check_tree(problem: Problem, nodes: list[thoughts.Node]):
  assert [n.index for n in nodes] == list(range(len(nodes)))
  assert all(n.parent < n.index for n in nodes)
  root = nodes[0]
  assert (root.parent, root.meta, root.text, root.rating) == (-1, "<problem>", problem.question, None)
  by_id = {n.index: n for n in nodes}
  # The real chain: the positive plain steps whose parent is root or another real step, in order.
  chain, parent = [], 0
  while True:
    children = [n for n in nodes if n.parent == parent and n.meta == "" and n.rating == POS]
    if not children:
      break
    assert len(children) == 1
    chain.append(children[0].text)
    parent = children[0].index
  assert chain == corpus.split_steps(problem)
  conclusions = [n for n in nodes if n.meta == "<conclusion>" and n.rating == POS]
  assert len(conclusions) == 1 and conclusions[0].parent == parent
  assert conclusions[0].text.endswith(f"\\boxed{{{problem.answer}}}")
  for n in nodes[1:]:
    if n.meta == "" and n.rating == NEG:  # a corrupted sibling of a real step
      real = [m for m in nodes if m.parent == n.parent and m.meta == "" and m.rating == POS]
      assert len(real) == 1 and real[0].text != n.text
    if n.meta == "<critic>":
      assert n.rating == UNK
    if n.meta == "<refine>":
      assert n.rating == POS and by_id[n.parent].rating in (NEG, UNK)
    if n.meta == "<conclusion>" and n.rating == NEG:
      assert not n.text.endswith(f"\\boxed{{{problem.answer}}}")


def test_trees_parse_back_and_have_the_shape(gsm8k):
  rng = np.random.default_rng(0)
  for problem in gsm8k:
    text = corpus.tree_text(problem, rng)
    nodes = thoughts.parse(text)
    assert thoughts.serialize(nodes) == text
    check_tree(problem, nodes)


def test_tree_without_extras_is_the_plain_chain(gsm8k):
  nodes = corpus.build_tree(gsm8k[0], np.random.default_rng(0), negatives=0.0, confirmations=0.0,
                            wrong_conclusions=0.0)
  assert [(n.parent, n.index, n.meta, n.rating) for n in nodes] == [
      (-1, 0, "<problem>", None), (0, 1, "", POS), (1, 2, "", POS), (2, 3, "<conclusion>", POS)]
  assert nodes[1].text == "Natalia sold 48/2 = <<48/2=24>>24 clips in May."
  assert nodes[3].text.endswith("\\boxed{72}")


def test_confirmations_quote_the_step_equation(gsm8k):
  nodes = corpus.build_tree(gsm8k[0], 0, negatives=0.0, confirmations=1.0, wrong_conclusions=0.0)
  assert [(n.parent, n.index, n.meta, n.rating) for n in nodes] == [
      (-1, 0, "<problem>", None), (0, 1, "", POS), (1, 2, "<critic>", UNK), (1, 3, "", POS), (3, 4, "<critic>", UNK),
      (3, 5, "<conclusion>", POS)]
  assert nodes[2].text == " Checking the calculation 48/2=24: this calculation is correct."
  assert nodes[4].text == " Checking the calculation 48+24=72: this calculation is correct."


def test_critics_name_the_wrong_equation_and_the_right_value(gsm8k):
  nodes = corpus.build_tree(gsm8k[2], np.random.default_rng(1), negatives=1.0, critics=1.0, refines=1.0)
  check_tree(gsm8k[2], nodes)
  wrong_steps = [n for n in nodes if n.meta == "" and n.rating == NEG]
  assert len(wrong_steps) == len(corpus.split_steps(gsm8k[2])) == 3
  for wrong in wrong_steps:
    (critic,) = [n for n in nodes if n.parent == wrong.index]
    (real,) = [n for n in nodes if n.parent == wrong.parent and n.rating == POS and n.meta == ""]
    (refine,) = [n for n in nodes if n.parent == critic.index]
    assert critic.meta == "<critic>" and refine.meta == "<refine>" and refine.text.strip() == real.text
    (wrong_equation,) = set(ANNOTATION.findall(wrong.text)) - set(ANNOTATION.findall(real.text))
    (right_equation,) = set(ANNOTATION.findall(real.text)) - set(ANNOTATION.findall(wrong.text))
    assert "=".join(wrong_equation) in critic.text and "=".join(right_equation) in critic.text


def test_same_seed_same_text_different_seed_different_text(gsm8k):
  def texts(seed):
    rng = np.random.default_rng(seed)
    return [corpus.tree_text(p, rng) for p in gsm8k]

  assert texts(7) == texts(7)
  assert texts(7) != texts(8)
  assert corpus.tree_text(gsm8k[3], 5) == corpus.tree_text(gsm8k[3], np.random.default_rng(5))


def test_policy_examples_round_trip_to_the_tree(gsm8k):
  for seed, problem in enumerate(gsm8k):
    nodes = corpus.build_tree(problem, np.random.default_rng(seed))
    examples = corpus.policy_examples(problem, np.random.default_rng(seed))
    assert len(examples) == len(nodes) - 1
    for node, (prompt, target) in zip(nodes[1:], examples):
      assert prompt.endswith("<start_of_thought>" + node.meta)
      assert target.endswith(f"<end_of_thought><start_of_rating>{node.rating}<end_of_rating>")
      parsed = thoughts.parse(prompt + target)
      last = parsed[-1]
      assert (last.parent, last.index, last.meta, last.text, last.rating) == (
          node.parent, node.index, node.meta, node.text, node.rating)
      assert [n.index for n in parsed] == [n.index for n in thoughts.path_to(nodes, node.index)]
      if node.meta == "<critic>":
        assert last.hint == "<hint> Point out the potential flaws in the current solution. </hint>"
      if node.meta == "":
        assert last.hint == ""  # the ground-truth hint is off by default


def test_policy_examples_ground_truth_hint(gsm8k):
  examples = corpus.policy_examples(gsm8k[0], 0, ground_truth_hints=1.0)
  plain = [p for p, _ in examples if p.endswith("<start_of_thought>")]
  assert plain and all("can got final answer 72</hint>\n<start_of_father_id>" in p for p in plain)


def test_rating_examples_are_matched_pairs(gsm8k):
  for seed, problem in enumerate(gsm8k):
    examples = corpus.rating_examples(problem, np.random.default_rng(seed))
    steps = corpus.split_steps(problem)
    assert len(examples) == 2 * (len(steps) + 1)  # every GSM8K step has an equation; plus the conclusion
    for (right, right_ok), (wrong, wrong_ok) in zip(examples[::2], examples[1::2]):
      assert (right_ok, wrong_ok) == (True, False)
      assert right.endswith("<end_of_thought><start_of_rating>") and wrong.endswith("<end_of_thought><start_of_rating>")
      cut = right.rindex("<start_of_thought>")
      assert wrong[:cut] == right[:cut] and wrong != right  # same path, same id, different step
      for prompt in (right, wrong):
        assert thoughts.parse(prompt + "<positive_rating><end_of_rating>")[-1].rating == POS
    assert examples[-2][0].endswith(f"\\boxed{{{problem.answer}}}<end_of_thought><start_of_rating>")


def test_sample_policy_prompt(gsm8k):
  problem = gsm8k[3]  # four reference steps
  steps = corpus.split_steps(problem)
  lengths = set()
  for seed in range(20):
    prompt = corpus.sample_policy_prompt(problem, np.random.default_rng(seed))
    assert prompt == corpus.sample_policy_prompt(problem, np.random.default_rng(seed))
    assert "<hint>" not in prompt and prompt.endswith("<end_of_local_id><start_of_thought>")
    nodes = thoughts.parse(prompt + "x<end_of_thought>")
    k = len(nodes) - 2  # reference steps before the new node
    lengths.add(k)
    assert [n.text for n in nodes[1:-1]] == steps[:k] and all(n.rating == POS for n in nodes[1:-1])
    assert (nodes[-1].parent, nodes[-1].index, nodes[-1].meta) == (k, k + 1, "")
  assert lengths == {0, 1, 2, 3}  # every position that still has a reference step next


def test_bad_arguments():
  problem = Problem("gsm8k_train/x", "q", "2+3=<<2+3=5>>5", "5")
  with pytest.raises(ValueError, match="negatives=1.5"):
    corpus.build_tree(problem, np.random.default_rng(0), negatives=1.5)
  with pytest.raises(TypeError, match="numpy.random.Generator"):
    corpus.build_tree(problem, "seed")
