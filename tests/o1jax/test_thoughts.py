"""The LLaMA-O1 text format: the OpenLongCoT Felix record, malformed texts, prompts, ratings, metas, hints."""

import ast
import math
import os

import pytest

from o1jax import thoughts

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEED = os.path.join(REPO_ROOT, "..", "shared", "seeds", "000_d7a46710ed15549e.txt")

# The OpenLongCoT-Pretrain record quoted in the seed (its line 18), kept here so the test does not depend only on
# the file. Note the space before every `<start_of_father_id>` after the first, the root without a rating, and
# the thoughts' own leading/trailing spaces.
FELIX = (
    "<start_of_father_id>-1<end_of_father_id><start_of_local_id>0<end_of_local_id><start_of_thought><problem>The "
    "average speed for an hour drive is 66 miles per hour. If Felix wanted to drive twice as fast for 4 hours, how "
    "many miles will he cover? <end_of_thought> <start_of_father_id>0<end_of_father_id><start_of_local_id>1"
    "<end_of_local_id><start_of_thought>Since Felix wants to drive twice as fast, he will drive at "
    "2*66=<<2*66=132>>132 miles per hour. <end_of_thought><start_of_rating><positive_rating><end_of_rating> "
    "<start_of_father_id>1<end_of_father_id><start_of_local_id>2<end_of_local_id><start_of_thought> If he drives "
    "for 4 hours, he will have driven for 4*132=<<4*132=528>>528 miles. <end_of_thought><start_of_rating>"
    "<positive_rating><end_of_rating> <start_of_father_id>1<end_of_father_id><start_of_local_id>3<end_of_local_id>"
    "<start_of_thought><critic> Felix wants to drive twice as fast as his original speed of 66 miles per hour. "
    "Multiplying 66 by 2 gives 132 miles per hour. This calculation is correct.<end_of_thought><start_of_rating>"
    "<unknown_rating><end_of_rating> <start_of_father_id>1<end_of_father_id><start_of_local_id>4<end_of_local_id>"
    "<start_of_thought><critic> If Felix drives at 132 miles per hour for 4 hours, the total distance he covers "
    "can be calculated by multiplying his speed by the time. 132 miles per hour * 4 hours = 528 miles. This "
    "calculation is correct.<end_of_thought><start_of_rating><unknown_rating><end_of_rating>")

POS, NEG, UNK = "<positive_rating>", "<negative_rating>", "<unknown_rating>"
QUESTION = ("The average speed for an hour drive is 66 miles per hour. If Felix wanted to drive twice as fast for 4 "
            "hours, how many miles will he cover? ")
STEP_1 = "Since Felix wants to drive twice as fast, he will drive at 2*66=<<2*66=132>>132 miles per hour. "
STEP_2 = " If he drives for 4 hours, he will have driven for 4*132=<<4*132=528>>528 miles. "


def seed_lines() -> list[str]:
  if not os.path.isfile(SEED):
    pytest.skip(f"seed file {SEED} not present")
  with open(SEED, encoding="utf-8") as f:
    return f.read().split("\n")


def test_felix_constant_is_the_seed_line():
  english = [line for line in seed_lines() if line.startswith("<start_of_father_id>-1") and "Felix wanted" in line]
  assert english == [FELIX]


@pytest.mark.parametrize("source", ["constant", "file"])
def test_felix_parses_to_hand_checked_nodes(source):
  text = FELIX if source == "constant" else seed_lines()[17]
  nodes = thoughts.parse(text)
  assert [n.parent for n in nodes] == [-1, 0, 1, 1, 1]
  assert [n.index for n in nodes] == [0, 1, 2, 3, 4]
  assert [n.meta for n in nodes] == ["<problem>", "", "", "<critic>", "<critic>"]
  assert [n.rating for n in nodes] == [None, POS, POS, UNK, UNK]
  assert nodes[0].text == QUESTION
  assert nodes[1].text == STEP_1
  assert nodes[2].text == STEP_2
  assert nodes[3].text.startswith(" Felix wants") and nodes[3].text.endswith("This calculation is correct.")
  assert [n.separator for n in nodes[1:]] == [" "] * 4
  assert all(n.hint == "" for n in nodes)
  assert thoughts.serialize(nodes) == text


def test_felix_chinese_translation_round_trips():
  chinese = seed_lines()[19]
  assert chinese.startswith("<start_of_father_id>-1") and "Felix" in chinese
  nodes = thoughts.parse(chinese)
  assert [n.parent for n in nodes] == [-1, 0, 1, 1, 1]
  assert nodes[0].text.endswith("多少英里?")  # no space before <end_of_thought> in this one
  assert thoughts.serialize(nodes) == chinese


def test_serialize_of_hand_built_nodes():
  nodes = [thoughts.Node(-1, 0, "<problem>", QUESTION, None), thoughts.Node(0, 1, "", STEP_1, POS),
           thoughts.Node(1, 2, "", STEP_2, POS)]
  expected = FELIX[:FELIX.index(" <start_of_father_id>1<end_of_father_id><start_of_local_id>3")]
  assert thoughts.serialize(nodes) == expected


ROOT = "<start_of_father_id>-1<end_of_father_id><start_of_local_id>0<end_of_local_id><start_of_thought><problem>Q?"


@pytest.mark.parametrize("text,position,message", [
    ("", 0, "expected '<start_of_father_id>' to open the root node, found end of text"),
    ("<start_of_father_id>-1<start_of_local_id>0<end_of_local_id>", 22,
     "expected '<end_of_father_id>' after the father id, found '<start_of_local_id>'"),
    ("<start_of_father_id>x1<end_of_father_id>", 20, "expected an integer father id, found 'x1'"),
    ("<start_of_father_id>-1<end_of_father_id><start_of_local_id>1.5<end_of_local_id>", 59,
     "expected an integer local id, found '1.5'"),
    ("<start_of_father_id>3<end_of_father_id>", 20, "expected father id -1 for the root node, found 3"),
    (ROOT + "<end_of_thought> <start_of_father_id>7<end_of_father_id><start_of_local_id>1<end_of_local_id>"
     "<start_of_thought>a<end_of_thought>", len(ROOT + "<end_of_thought> <start_of_father_id>"),
     "father id 7 is not the local id of an earlier node"),
    (ROOT + "<end_of_thought> <start_of_father_id>0<end_of_father_id><start_of_local_id>0<end_of_local_id>",
     len(ROOT + "<end_of_thought> <start_of_father_id>0<end_of_father_id><start_of_local_id>"),
     "local id 0 was already used"),
    (ROOT + "<end_of_thought><start_of_rating><great_rating><end_of_rating>",
     len(ROOT + "<end_of_thought><start_of_rating>"), "found '<great_rating>'"),
    (ROOT + "<end_of_thought><start_of_rating><positive_rating>", len(ROOT + "<end_of_thought><start_of_rating>"
                                                                       "<positive_rating>"),
     "expected '<end_of_rating>' after the rating, found end of text"),
    (ROOT + " no end <start_of_father_id>0", len(ROOT + " no end "),
     "expected '<end_of_thought>' to close the thought opened at character 95, found '<start_of_father_id>'"),
    (ROOT + " the <critic> tag<end_of_thought>", len(ROOT + " the "), "found '<critic>'"),
    (ROOT, len(ROOT), "expected '<end_of_thought>' to close the thought opened at character 95, found end of text"),
    (ROOT + "<end_of_thought> <begin_node>", len(ROOT + "<end_of_thought> "),
     "expected '<start_of_father_id>' to open a node, found '<begin_node>'"),
    (ROOT + "<end_of_thought>\n", len(ROOT + "<end_of_thought>\n"),
     "expected '<start_of_father_id>' to open a node, found end of text"),
    (ROOT + "<end_of_thought><hint> no close\n<start_of_father_id>", len(ROOT + "<end_of_thought><hint> no close\n"),
     "expected '</hint>' to close the hint opened at character"),
    ("<start_of_father_id>-1<end_of_father_id><start_of_local_id>0<end_of_local_id><start_of_thought><expansion>x",
     95, "found '<expansion>'"),
])
def test_malformed_text_names_the_position(text, position, message):
  with pytest.raises(thoughts.ThoughtFormatError) as error:
    thoughts.parse(text)
  assert str(error.value).startswith(f"at character {position}: ")
  assert message in str(error.value)


def test_format_error_is_a_value_error():
  assert issubclass(thoughts.ThoughtFormatError, ValueError)


CRITIC_HINT_TEXT = "<hint> Point out the potential flaws in the current solution. </hint>"
ROOT_LINE = ("<start_of_father_id>-1<end_of_father_id><start_of_local_id>0<end_of_local_id><start_of_thought><problem>"
             + QUESTION + "<end_of_thought>")
STEP_1_LINE = ("<start_of_father_id>0<end_of_father_id><start_of_local_id>1<end_of_local_id><start_of_thought>"
               + STEP_1 + "<end_of_thought><start_of_rating><positive_rating><end_of_rating>")


def test_policy_prompt_layout_and_round_trip():
  path = thoughts.parse(FELIX)[:2]
  prompt = thoughts.policy_prompt(path, "<critic>", 5)
  # LLaMA-O1 policy_head_template: path joined by newlines, hint glued to the last node, newline, new header.
  assert prompt == (ROOT_LINE + "\n" + STEP_1_LINE + CRITIC_HINT_TEXT + "\n<start_of_father_id>1<end_of_father_id>"
                    "<start_of_local_id>5<end_of_local_id><start_of_thought><critic>")
  generated = " The step is fine.<end_of_thought>"
  assert thoughts.parse_step(generated) == " The step is fine."
  nodes = thoughts.parse(prompt + generated + "<start_of_rating><unknown_rating><end_of_rating>")
  assert [(n.parent, n.index, n.meta, n.rating) for n in nodes] == [
      (-1, 0, "<problem>", None), (0, 1, "", POS), (1, 5, "<critic>", UNK)]
  assert nodes[2].text == " The step is fine." and nodes[2].hint == CRITIC_HINT_TEXT
  assert nodes[2].separator == CRITIC_HINT_TEXT + "\n"
  assert thoughts.serialize(nodes) == prompt + generated + "<start_of_rating><unknown_rating><end_of_rating>"
  # Without a rating block it parses too (what the search stores before rating).
  assert thoughts.parse(prompt + generated)[-1].rating is None


def test_policy_prompt_plain_expansion_and_ground_truth_hint():
  path = thoughts.parse(FELIX)[:1]
  plain = thoughts.policy_prompt(path, "", 1)
  assert plain == ROOT_LINE + "\n<start_of_father_id>0<end_of_father_id><start_of_local_id>1<end_of_local_id>" \
                              "<start_of_thought>"
  assert thoughts.policy_prompt(path, "<expansion>", 1) == plain
  with_gt = thoughts.policy_prompt(path, "", 1, thoughts.hint("", ground_truth="528"))
  assert with_gt == (ROOT_LINE + "<hint> Try generate a reasonable rationale solution that can got final answer 528"
                     "</hint>\n<start_of_father_id>0<end_of_father_id><start_of_local_id>1<end_of_local_id>"
                     "<start_of_thought>")
  assert thoughts.parse(with_gt + STEP_1 + "<end_of_thought>")[1].text == STEP_1


def test_rating_prompt_layout_and_round_trip():
  nodes = thoughts.parse(FELIX)
  prompt = thoughts.rating_prompt(nodes[:2], nodes[2])
  # LLaMA-O1 value_head_template: no hint, the node's thought, then <start_of_rating>.
  assert prompt == (ROOT_LINE + "\n" + STEP_1_LINE + "\n<start_of_father_id>1<end_of_father_id><start_of_local_id>2"
                    "<end_of_local_id><start_of_thought>" + STEP_2 + "<end_of_thought><start_of_rating>")
  parsed = thoughts.parse(prompt + "<negative_rating><end_of_rating>")
  assert (parsed[-1].text, parsed[-1].rating) == (STEP_2, NEG)


def test_prompt_arguments_are_checked():
  nodes = thoughts.parse(FELIX)
  with pytest.raises(ValueError, match="expected a root-to-node chain"):
    thoughts.policy_prompt([nodes[0], nodes[2], nodes[3]], "", 9)
  with pytest.raises(ValueError, match="not already in the path"):
    thoughts.policy_prompt(nodes[:2], "", 1)
  with pytest.raises(ValueError, match="meta action '<think>'"):
    thoughts.policy_prompt(nodes[:2], "<think>", 7)
  with pytest.raises(ValueError, match="node 2 has parent 1; expected the last path node 0"):
    thoughts.rating_prompt(nodes[:1], nodes[2])
  with pytest.raises(ValueError, match="path is empty"):
    thoughts.rating_prompt([], nodes[0])


def test_path_to():
  nodes = thoughts.parse(FELIX)
  assert [n.index for n in thoughts.path_to(nodes, 4)] == [0, 1, 4]
  assert [n.index for n in thoughts.path_to(nodes, 0)] == [0]


@pytest.mark.parametrize("generated,position,message", [
    ("a step", 6, "expected '<end_of_thought>' to end the step, found end of text"),
    ("a<end_of_rating> step<end_of_thought>", 1, "found '<end_of_rating>'"),
    ("<critic> again<end_of_thought>", 0, "found '<critic>'"),
    ("step<end_of_thought><start_of_rating>", 20, "expected end of text after '<end_of_thought>'"),
])
def test_parse_step_rejects(generated, position, message):
  with pytest.raises(thoughts.ThoughtFormatError, match=f"^at character {position}: .*{message}"):
    thoughts.parse_step(generated)


def test_serialize_rejects_what_would_not_parse_back():
  with pytest.raises(ValueError, match="not the id of an earlier node"):
    thoughts.serialize([thoughts.Node(-1, 0, "", "q", None), thoughts.Node(5, 1, "", "a", POS)])
  with pytest.raises(ValueError, match="appears twice"):
    thoughts.serialize([thoughts.Node(-1, 0, "", "q", None), thoughts.Node(0, 0, "", "a", POS)])
  with pytest.raises(ValueError, match="expected -1"):
    thoughts.serialize([thoughts.Node(0, 1, "", "a", POS)])
  with pytest.raises(ValueError, match="format token '<end_of_thought>'"):
    thoughts.Node(0, 1, "", "a<end_of_thought>", POS)
  with pytest.raises(ValueError, match="rating"):
    thoughts.Node(0, 1, "", "a", "<good_rating>")
  with pytest.raises(ValueError, match="separator"):
    thoughts.Node(0, 1, "", "a", POS, separator=" x ")


@pytest.mark.parametrize("value,token", [
    (math.log(0.9), POS), (0.0, POS), (math.log(0.5), POS), (math.log(0.49), NEG), (-30.0, NEG),
    (None, UNK), (True, POS), (False, NEG), ("positive", POS), ("negative", NEG), ("unknown", UNK), (NEG, NEG),
])
def test_rating_token(value, token):
  assert thoughts.rating_token(value) == token


@pytest.mark.parametrize("bad", [0.5, float("nan"), "great"])
def test_rating_token_rejects(bad):
  with pytest.raises(ValueError, match="rating"):
    thoughts.rating_token(bad)


def test_rating_labels():
  assert [thoughts.rating_label(t) for t in (POS, NEG, UNK)] == ["positive", "negative", "unknown"]


def test_meta_actions():
  assert thoughts.META_ACTIONS == ("<expansion>", "<problem>", "<critic>", "<refine>", "<conclusion>")
  assert [thoughts.meta_index(m) for m in ("", "<expansion>", "<problem>", "<critic>", "<refine>", "<conclusion>")] \
      == [0, 0, 1, 2, 3, 4]
  assert [thoughts.meta_prefix(i) for i in range(5)] == ["", "<problem>", "<critic>", "<refine>", "<conclusion>"]
  with pytest.raises(ValueError):
    thoughts.meta_index("<think>")
  with pytest.raises(ValueError):
    thoughts.meta_prefix(5)


def seed_hints() -> dict[str, str]:
  """The hint assignments of the seed walk-through, evaluated as Python string literals."""
  hints = {}
  for line in seed_lines():
    name, sep, value = line.partition(" = ")
    if sep and name in ("hint", "hint_for_critics", "hint_for_refine", "hint_for_conclusion",
                        "hint_for_divide_and_conquer"):
      hints[name] = ast.literal_eval(value.removeprefix("f"))
  assert len(hints) == 5
  return hints


def test_hints_are_llama_o1s():
  seed = seed_hints()
  assert thoughts.hint("<critic>") == seed["hint_for_critics"] == CRITIC_HINT_TEXT
  assert thoughts.hint("<refine>") == seed["hint_for_refine"]
  assert thoughts.hint("<conclusion>") == seed["hint_for_conclusion"]
  assert thoughts.hint("<conclusion>").endswith("Final answer should bracket in \\box{answer} </hint>")
  assert thoughts.hint("<problem>") == seed["hint_for_divide_and_conquer"]
  assert thoughts.hint("", ground_truth="72") == seed["hint"].format(GT="72")
  assert thoughts.hint("") == ""  # evaluation: no ground truth anywhere
  # LLaMA-O1's compute_policy_head: conclusion gets the critic hint, plain expansion always the ground truth.
  assert thoughts.hint("<conclusion>", llama_o1_compat=True) == seed["hint_for_critics"]
  assert thoughts.hint("<expansion>", "3", llama_o1_compat=True) == seed["hint"].format(GT="3")
  with pytest.raises(ValueError, match="ground_truth is None"):
    thoughts.hint("", llama_o1_compat=True)


def test_special_tokens_unchanged():
  assert thoughts.SPECIAL_TOKENS == (
      "<start_of_father_id>", "<end_of_father_id>", "<start_of_local_id>", "<end_of_local_id>",
      "<start_of_thought>", "<end_of_thought>", "<start_of_rating>", "<end_of_rating>",
      "<positive_rating>", "<negative_rating>", "<unknown_rating>",
      "<problem>", "<critic>", "<refine>", "<conclusion>", "<hint>", "</hint>")
