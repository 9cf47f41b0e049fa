"""Evaluation metrics on hand-worked examples, with the edge cases the official scripts handle (empty
answers, case and punctuation, several references). BLEU's oracle is sacrebleu's own corpus_bleu; the tree
edit distance's oracle is the recursive definition of forest edit distance, computed independently."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemma3vl.errors import Gemma3VLError
from gemma3vl.evaluation.metrics import (
    METRICS, anls, check_metrics, compute_stats, exact_match, normalise_vqa_answer, score, token_f1, tool_call_match,
    vqa_accuracy,
)
from gemma3vl.evaluation.report import paired_bootstrap
from gemma3vl.evaluation.tree_edit import (
    Node, document_distance, document_tree, edit_distance, field_counts, flatten, normalise, parse_json_answer,
    ted_accuracy, tree_edit_distance,
)


# ------------------------------------------------------------------------------------- text answers
def test_exact_match_normalises_case_punctuation_articles_and_takes_any_reference():
    assert exact_match("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert exact_match("  a   dog. ", ["cat", "Dog"]) == 1.0
    assert exact_match("dogs", ["dog"]) == 0.0
    assert exact_match("", [""]) == 1.0 and exact_match("", ["x"]) == 0.0


def test_token_f1_by_hand():
    # pred tokens: big red car; ref: red car parked -> common 2, P = 2/3, R = 2/3, F1 = 2/3
    assert token_f1("the big red car", ["a red car parked"]) == pytest.approx(2 / 3)
    # best over references; repeated tokens count as often as both sides have them
    assert token_f1("red red", ["red", "blue"]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert token_f1("", [""]) == 1.0 and token_f1("", ["something"]) == 0.0 and token_f1("x", [""]) == 0.0


# ------------------------------------------------------------------------------------- VQA accuracy
def test_vqa_answer_normalisation_follows_the_official_script():
    assert normalise_vqa_answer("Two dogs.") == "2 dogs"  # number words, final period
    assert normalise_vqa_answer("The dog, isnt it?") == "dog isn't it"  # articles, contractions, marks
    assert normalise_vqa_answer("1,000 dollars") == "1000 dollars"  # a digit comma digit: marks are dropped
    assert normalise_vqa_answer("black/white") == "black white"  # a mark not next to a space splits
    assert normalise_vqa_answer("3.5 kg") == "3.5 kg"  # a period inside a number stays
    assert normalise_vqa_answer("\tYES\n") == "yes"


def test_vqa_accuracy_is_the_leave_one_out_average():
    ten = ["2"] * 2 + ["3"] * 8
    # "two" -> "2" matches 2 humans: leaving out one of them (2 of 10 subsets) leaves 1 match -> 1/3,
    # leaving out a "3" (8 subsets) leaves 2 -> 2/3: (2/3 + 16/3) / 10 = 0.6
    assert vqa_accuracy("two", ten) == pytest.approx(0.6)
    # three humans: 3 subsets keep 2 matches (2/3), 7 keep 3 (capped at 1): (2 + 7) / 10
    assert vqa_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("2", ["2"] * 4 + ["3"] * 6) == 1.0  # 3 matches in every subset
    assert vqa_accuracy("Yes.", ["yes"] * 10) == 1.0
    assert vqa_accuracy("", ["yes"] * 10) == 0.0
    assert vqa_accuracy("no", ["yes"] * 10) == 0.0
    assert vqa_accuracy("Yes", ["yes"]) == 1.0  # one reference: normalised exact match
    assert vqa_accuracy("yes", []) == 0.0


def test_vqa_contractions_are_the_official_table_not_every_apostrophe_less_form():
    """Worked from vqaEval.py (GT-Vision-Lab/VQA): its contraction table is looked up with the lower-cased word,
    so only its exact keys change. Before, every apostrophe-less spelling of a contraction was mapped, so "im",
    "lets", "shes" and "couldntve" became "i'm", "let's", "she's", "couldn't've" where the script leaves them."""
    for word in ("im", "ive", "lets", "shes", "couldntve", "owsat"):
        assert normalise_vqa_answer(word) == word  # not keys of the table ("Im", "Ive" have a capital I there)
    assert normalise_vqa_answer("dont") == "don't" and normalise_vqa_answer("couldnt've") == "couldn't've"
    assert normalise_vqa_answer("somebody'd") == "somebodyd"  # the table maps this one the other way round
    # the answer "I'm" is "i'm" there; ten humans who typed "im" (already in normal form) do not match it
    assert vqa_accuracy("I'm", ["im"] * 10) == 0.0 and vqa_accuracy("im", ["im"] * 10) == 1.0
    # periodStrip.sub("", text, re.UNICODE): the third argument is the count, so at most 32 periods go
    assert normalise_vqa_answer("yes" + "." * 40) == "yes" + "." * 8


# ------------------------------------------------------------------------------------------- ANLS
def test_anls_by_hand():
    assert anls("Dear dr. Lobo", ["Dear Dr. Lobo", "Dr. Lobo"]) == 1.0  # case ignored
    assert anls("12/15/89", ["12/15/88"]) == pytest.approx(1 - 1 / 8)
    assert anls("abcd", ["abxy"]) == 0.5  # NL = 0.5 is kept, as the RRC script keeps 1 - NL >= 0.5
    assert anls("abcde", ["abxye"]) == pytest.approx(0.6)  # NL = 0.4
    assert anls("  Denver   Broncos ", ["denver broncos"]) == 1.0  # stripped, whitespace collapsed
    assert anls("", ["x"]) == 0.0 and anls("", [""]) == 1.0
    assert anls("cat", ["dog", "cats"]) == pytest.approx(0.75)  # best reference
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3


def test_anls_is_the_rrc_scripts():
    """Worked from the official DocVQA / InfographicVQA (RRC) script: ``question_result = 1 - min(NL)``, set to 0
    only when it is below 0.5; NL divides the distance of the normalised answers by the longer *raw* answer
    (``max(len(answer.upper()), len(prediction.upper()))``). Before: 0 at NL = 0.5, and the normalised lengths."""
    assert anls("12", ["13"]) == 0.5  # NL = 1/2: kept (0 before)
    # reference stored as "abc  ": distance 1 ("abd" vs "abc"), divided by 5 raw characters -> 0.8 (2/3 before)
    assert anls("abd", ["abc  "]) == pytest.approx(0.8)
    assert anls("ab", ["xyz"]) == 0.0  # NL = 1


# ---------------------------------------------------------------------------------- CORD / Donut
def test_document_normal_form_and_flattening():
    gt = {"total": {"total_price": "10", "cash": ""}, "menu": [{"nm": " A ", "cnt": 1}, {"nm": "B"}], "x": None}
    assert normalise(gt) == {"menu": [{"nm": ["A"], "cnt": ["1"]}, {"nm": ["B"]}],
                             "total": [{"total_price": ["10"]}]}
    assert sorted(flatten(gt)) == [("menu.cnt", "1"), ("menu.nm", "A"), ("menu.nm", "B"),
                                   ("total.total_price", "10")]


def test_non_string_values_normalise_as_donuts_normalize_dict():
    """Worked from Donut's JSONParseEvaluator.normalize_dict on json.loads'd answers: ``if not data: return {}``
    drops a lone 0, 0.0 and false like an empty value; a lone true is ``str(True)``; a list of scalars keeps only
    items whose type is str, int or float (no bools, no nulls). Before: 0 -> "0", false -> "false", true -> "true"
    everywhere."""
    doc = {"a": 0, "b": False, "c": True, "d": [True, None, 0, 1.5, "x"], "e": 0.0, "f": 2}
    assert normalise(doc) == {"c": ["True"], "d": ["0", "1.5", "x"], "f": ["2"]}
    assert field_counts({"cnt": 0}, {"cnt": "0"}) == (0, 0, 1)  # the answer has no field at all
    assert ted_accuracy({"cnt": 0}, {"cnt": "0"}) == 0.0
    assert field_counts({"cnt": [0]}, {"cnt": "0"}) == (1, 1, 1)  # inside a list, 0 is the text "0"


def test_field_f1_is_micro_over_the_set():
    gt = {"menu": [{"nm": "x", "price": "1"}], "total": {"t": "1"}}
    pred = {"menu": [{"nm": "x", "price": "2"}], "total": {"t": "1"}}
    assert field_counts(pred, gt) == (2, 3, 3)
    assert field_counts({"a": ["1", "1"]}, {"a": ["1"]}) == (1, 2, 1)  # a reference pair matches once
    # two samples: (2 of 3 predicted, 3 expected) and (0 of 1, 2): micro F1 = 2*2 / (4 + 5)
    predictions = ['{"menu":[{"nm":"x","price":"2"}],"total":{"t":"1"}}', '{"a":"9"}']
    references = [['{"menu":[{"nm":"x","price":"1"}],"total":{"t":"1"}}'], ['{"a":"1","b":"2"}']]
    assert score("field_f1", predictions, references) == pytest.approx(4 / 9)
    assert score("field_precision", predictions, references) == pytest.approx(2 / 4)
    assert score("field_recall", predictions, references) == pytest.approx(2 / 5)
    # not JSON: an empty prediction (no pairs), every reference pair missed
    assert score("field_f1", ["I cannot read this"], [['{"a":"1"}']]) == 0.0


def test_ted_accuracy_by_hand():
    # root -> a -> leaf "12": building it from the empty tree costs 1 (key) + 2 (leaf text) = 3
    assert ted_accuracy({"a": "13"}, {"a": "12"}) == pytest.approx(1 - 1 / 3)  # one character
    assert ted_accuracy({"a": "12"}, {"a": "12"}) == 1.0
    assert ted_accuracy({}, {"a": "12"}) == 0.0
    assert ted_accuracy({"b": "12"}, {"a": "12"}) == pytest.approx(1 - 1 / 3)  # relabel the key
    assert ted_accuracy({"a": "12", "zzz": "a long wrong value"}, {"a": "12"}) == 0.0  # clipped at 0
    assert ted_accuracy({}, {}) == 1.0 and ted_accuracy({"a": "1"}, {}) == 0.0
    # key order does not matter (normalised), list order does
    assert ted_accuracy({"b": "1", "a": "2"}, {"a": "2", "b": "1"}) == 1.0
    assert ted_accuracy({"a": ["x", "y"]}, {"a": ["y", "x"]}) < 1.0


def test_json_answers_are_parsed_leniently():
    assert parse_json_answer('```json\n{"a": 1}\n```') == {"a": 1}
    assert parse_json_answer('Here it is: {"a": {"b": "c"}} hope it helps') == {"a": {"b": "c"}}
    assert parse_json_answer("no json") is None and parse_json_answer("") is None


def _forest_distance(first: tuple, second: tuple, costs) -> float:
    """The recursive definition (Zhang & Shasha's eq. 1), memoised: an oracle independent of keyroots."""
    insert, remove, update = costs

    @functools.lru_cache(maxsize=None)
    def distance(f: tuple, g: tuple) -> float:
        if not f and not g:
            return 0.0
        if not g:
            return distance(f[:-1] + tuple(f[-1].children), g) + remove(f[-1])
        if not f:
            return distance(f, g[:-1] + tuple(g[-1].children)) + insert(g[-1])
        v, w = f[-1], g[-1]
        return min(
            distance(f[:-1] + tuple(v.children), g) + remove(v),
            distance(f, g[:-1] + tuple(w.children)) + insert(w),
            distance(tuple(v.children), tuple(w.children)) + distance(f[:-1], g[:-1]) + update(v, w),
        )

    return distance(first, second)


class _Tree(Node):
    __hash__ = object.__hash__  # identity, for the oracle's memo

    def __eq__(self, other):
        return self is other


@st.composite
def trees(draw, depth=3):
    label = draw(st.sampled_from("abc"))
    children = draw(st.lists(trees(depth=depth - 1), max_size=3)) if depth > 0 else []
    return _Tree(label, children)


@settings(max_examples=60, deadline=None)
@given(trees(), trees())
def test_zhang_shasha_equals_the_recursive_definition(first, second):
    costs = (lambda n: 1.0, lambda n: 2.0, lambda a, b: 0.0 if a.label == b.label else 1.5)
    expected = _forest_distance((first,), (second,), costs)
    got = tree_edit_distance(first, second, insert_cost=costs[0], remove_cost=costs[1], update_cost=costs[2])
    assert got == pytest.approx(expected)


def test_tree_edit_distance_by_hand():
    unit = dict(insert_cost=lambda n: 1, remove_cost=lambda n: 1, update_cost=lambda a, b: int(a.label != b.label))
    # Zhang & Shasha's example: f(d(a c(b)) e) -> f(c(d(a b)) e) costs 2
    first = Node("f", [Node("d", [Node("a"), Node("c", [Node("b")])]), Node("e")])
    second = Node("f", [Node("c", [Node("d", [Node("a"), Node("b")])]), Node("e")])
    assert tree_edit_distance(first, second, **unit) == 2
    assert tree_edit_distance(first, first, **unit) == 0
    # Donut's costs: a leaf costs its length to insert
    assert document_distance(Node("<root>"), document_tree({"k": "abc"})) == 1 + 3


# ----------------------------------------------------------------------------------------------- BLEU
def test_bleu4_equals_sacrebleu_on_the_corpus_and_sums_per_sample():
    sacrebleu = pytest.importorskip("sacrebleu")
    hypotheses = ["a man rides a horse on the beach", "two dogs play in the snow", "a red bus", ""]
    references = [["a man is riding a horse on a beach", "someone rides a horse by the sea"],
                  ["two dogs are playing in snow", "dogs playing in the snow"],
                  ["a red double decker bus", "the bus is red"],
                  ["a cat", "a small cat"]]
    expected = sacrebleu.corpus_bleu(hypotheses, [list(r) for r in zip(*references)], lowercase=True).score / 100
    assert score("bleu4", hypotheses, references) == pytest.approx(expected, abs=1e-9)
    assert 0 < expected < 1
    # upper case is ignored, and a perfect answer scores 1
    assert score("bleu4", ["A MAN RIDES A HORSE ON THE BEACH"], [["a man rides a horse on the beach"]]) == \
        pytest.approx(1.0)
    # text is NFC-composed first, as for every metric: a combining accent matches the precomposed letter
    assert score("bleu4", ["caf\u00e9 au lait ok"], [["cafe\u0301 au lait ok"]]) == pytest.approx(1.0)
    # resamples recompute corpus BLEU from summed counts: against itself, every difference is 0
    stats = compute_stats(["bleu4"], hypotheses, references)["bleu4"]
    assert paired_bootstrap("bleu4", stats, stats, resamples=50) == (0.0, 0.0)


def test_bleu4_signature_is_sacrebleus_after_scoring():
    # report.json's bleu4_signature: sacrebleu refuses a signature before a corpus is scored (nrefs unknown)
    BLEU = pytest.importorskip("sacrebleu.metrics").BLEU

    from gemma3vl.evaluation.metrics import bleu_signature

    references = [["a red bus", "the bus is red"], ["a cat", "a small cat"]]
    oracle = BLEU(lowercase=True, tokenize="13a", smooth_method="exp")
    oracle.corpus_score(["a red bus", "a cat"], [list(r) for r in zip(*references)])
    assert bleu_signature(references) == str(oracle.get_signature())
    assert "nrefs:2|" in bleu_signature(references)
    assert "nrefs:var|" in bleu_signature([["a"], ["b", "c"]])


def test_unknown_or_missing_metrics_are_clear_errors(monkeypatch):
    with pytest.raises(Gemma3VLError, match="unknown metric.*cider.*the metrics are"):
        check_metrics(["cider"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sacrebleu" else real(name, *a))
    with pytest.raises(Gemma3VLError, match=r"pip install 'gemma3vl\[eval\]'"):
        check_metrics(["bleu4"])


# ------------------------------------------------------------------------------------------- bootstrap
def test_paired_bootstrap_interval():
    rng = np.random.default_rng(1)
    first = rng.integers(0, 2, size=(200, 1)).astype(float)
    # identical models: every resample differs by exactly 0
    assert paired_bootstrap("exact_match", first, first) == (0.0, 0.0)
    second = first.copy()
    second[:40] = 0.0  # the second model misses some the first got: a clearly positive difference
    low, high = paired_bootstrap("exact_match", first, second)
    difference = float(first.mean() - second.mean())
    assert 0 < low <= difference <= high
    assert paired_bootstrap("exact_match", first, second) == (low, high)  # seeded
    # the interval's half-width is about 1.96 standard errors of the paired difference (normal approximation)
    half_width = 1.96 * float((first - second).std()) / math.sqrt(len(first))
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.25)


def test_bootstrap_recomputes_corpus_metrics_from_their_sums():
    predictions = ['{"a":"1","b":"2"}', '{"a":"1"}', '{}']
    references = [['{"a":"1","b":"2"}'], ['{"a":"1","b":"2","c":"3"}'], ['{"a":"1"}']]
    stats = compute_stats(["field_f1"], predictions, references)["field_f1"]
    empty = compute_stats(["field_f1"], ["{}"] * 3, references)["field_f1"]
    low, high = paired_bootstrap("field_f1", stats, empty, resamples=200)
    # any resample's F1 lies between the worst and best per-sample F1 -> so does the difference (empty = 0)
    per_sample = METRICS["field_f1"].sample_scores(stats)
    assert per_sample == pytest.approx([1.0, 2 * 1 / (1 + 3), 0.0])
    assert 0 <= low <= high <= 1 and not math.isnan(low)


@pytest.mark.parametrize("prediction,references,expected", [
    ("104", ["100"], 1.0),          # 4% off: inside ChartQA's 5%
    ("106", ["100"], 0.0),          # 6% off
    ("95", ["100"], 1.0),           # exactly 5% off counts (<=)
    ("12%", ["0.12"], 1.0),         # a trailing % divides by 100
    ("5%%", ["0.05"], 1.0),         # pix2struct rstrips every trailing % (0 before: "5%" is not a float)
    ("0.5", ["0"], 0.0),            # a zero reference: exact string match only
    ("0", ["0"], 1.0),
    ("Yes", ["yes"], 1.0),          # not numbers: case-insensitive exact match
    ("yes.", ["yes"], 0.0),         # no other normalisation
    ("Café", ["cafe\u0301"], 1.0),  # NFC before comparing
    ("7", ["six", "7.2"], 1.0),     # best over the references
    ("", ["1"], 0.0),
])
def test_relaxed_accuracy_hand_worked(prediction, references, expected):
    """ChartQA relaxed accuracy, cases worked by hand from pix2struct's relaxed_correctness."""
    from gemma3vl.evaluation.metrics import relaxed_accuracy, score

    assert relaxed_accuracy(prediction, references) == expected
    assert score("relaxed_accuracy", [prediction], [references]) == expected


@pytest.mark.parametrize("prediction, reference, expected", [
    ('[get_weather(city="Paris")]', '[get_weather(city="Paris")]', 1.0),
    ("```tool_code\nget_weather(city='Paris')\n```", '[get_weather(city="Paris")]', 1.0),  # spelling ignored
    ('[f(a=1, b=[1, 2]), g()]', '[g(), f(b=[1, 2], a=1)]', 1.0),  # call and argument order ignored
    ('[f(a=1.0)]', '[f(a=1)]', 1.0),  # equal as JSON numbers
    ('[get_weather(city="Rome")]', '[get_weather(city="Paris")]', 0.0),
    ('[get_time(city="Paris")]', '[get_weather(city="Paris")]', 0.0),
    ('[f(a=1)]', '[f(a=1), f(a=1)]', 0.0),  # a call made once is not a call made twice
    ('Let me look.\n[get_weather(city="Paris")]', 'Checking.\n[get_weather(city="Paris")]', 1.0),  # text aside
    ('[get_weather(city="Paris")] is what I would call', '[get_weather(city="Paris")]', 0.0),
    ("It is sunny.", '[get_weather(city="Paris")]', 0.0),
    ("It is sunny!", "it is sunny", 1.0),  # a text reference: normalised exact match
])
def test_tool_call_match_by_hand(prediction, reference, expected):
    assert tool_call_match(prediction, [reference]) == expected
    assert score("tool_call_match", [prediction], [[reference]]) == expected
