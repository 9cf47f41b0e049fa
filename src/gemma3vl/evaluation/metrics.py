"""The metrics each field reports, from their published definitions.

Every metric turns each (prediction, references) pair into a small vector of statistics, and a score from
the sum of those vectors over any set of samples. A mean metric's vector is the sample's score; corpus
metrics keep what their corpus formula sums: field F1 (micro, as Donut's evaluator computes it) keeps
(matched, predicted, expected) counts, BLEU its n-gram counts and lengths. So one sample's score, the whole
set's, and a bootstrap resample's all come from the same function, exactly.

* ``exact_match``: SQuAD's normalisation (lower case, punctuation and articles removed, whitespace
  collapsed); 1 if the prediction equals any reference.
* ``token_f1``: SQuAD's token-overlap F1 after that normalisation, best over the references.
* ``vqa_accuracy``: the official VQA evaluation (Antol et al. 2015; ``vqaEval.py``): answers normalised
  (punctuation, periods, number words, articles, the script's contraction table), then
  ``min(#matching humans / 3, 1)`` averaged over the leave-one-out subsets of the references (10 choose 9 for
  VQAv2's ten answers). The official script normalises the model's answer fully but the references only
  partly (punctuation, and only when they disagree: VQAv2 stores them normalised already); we normalise the
  references fully as well, which gives the same score on references in normal form and credits ``yes``
  against references typed ``Yes`` (0 there). With a single reference there is no subset to leave one out of
  (the script scores 0): the score is then the normalised exact match.
* ``anls``: Average Normalised Levenshtein Similarity (Biten et al. 2019, ST-VQA / DocVQA) as the official
  RRC script computes it: answers lower cased, stripped, inner whitespace collapsed, the distance divided by
  the longer of the two answers as given; ``1 - NL`` when it is at least 0.5 (``NL <= 0.5``), else 0; best
  over the references.
* ``field_f1`` / ``field_precision`` / ``field_recall`` and ``ted_accuracy``: receipts (CORD) as Donut
  scores them (see ``tree_edit``); predictions are parsed as JSON, and one that is not JSON is empty.
* ``bleu4``: corpus BLEU-4 by sacrebleu (``pip install 'gemma3vl[eval]'``), lower-cased, 13a tokenisation,
  every reference of a sample used, on a 0-1 scale. It is sacrebleu's BLEU, not coco-caption's
  (PTB-tokenised) one: compare numbers only with numbers computed the same way (the signature is reported).

Every text comparison is on NFC-composed Unicode (``nfc``): canonically equivalent spellings ("é" as one code
point or as ``e`` + a combining accent) are the same answer; compatibility forms (full-width digits) are not
folded, as no published script folds them.

CIDEr-D is not provided: its one packaged implementation (pycocoevalcap 1.2, from 2020, a 104 MB wheel
with Java jars for its tokeniser) is not a well-kept library; ``predictions.jsonl`` holds what it needs.
"""

from __future__ import annotations

import json
import re
import string
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from gemma3vl.errors import Gemma3VLError
from gemma3vl.evaluation.tree_edit import edit_distance, field_counts, parse_json_answer, ted_accuracy

EVAL_EXTRA = "pip install 'gemma3vl[eval]'  (or: pip install sacrebleu)"


# ------------------------------------------------------------------------------- SQuAD-style text answers
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def nfc(text: str) -> str:
    """Unicode canonical composition (NFC), applied before every text metric compares strings.

    "café" typed as ``e`` + combining acute (NFD, what macOS file names and some OCR / tokenizer outputs hold)
    and as one precomposed ``é`` (NFC) are the same text by the Unicode standard (canonical equivalence), yet
    differ as code points: without this a correct answer scored 0 in exact match and lost characters in ANLS.
    The official scripts (SQuAD, vqaEval.py, the DocVQA/ST-VQA ANLS script) compare raw code points; NFC changes
    nothing they would call equal or different except canonically equivalent spellings. Compatibility forms
    (NFKC: full-width digits "１２", ligatures, superscripts) are deliberately *not* folded: they are different
    characters, and folding them would depart from every published definition."""
    return unicodedata.normalize("NFC", text)


def normalise_text(text: str) -> str:
    text = "".join(ch for ch in nfc(text).lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    wanted = normalise_text(prediction)
    return float(any(wanted == normalise_text(reference) for reference in references))


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """SQuAD's F1 over normalised tokens; when either side has no tokens, 1 only if both have none."""
    predicted = normalise_text(prediction).split()
    best = 0.0
    for reference in references:
        expected = normalise_text(reference).split()
        if not predicted or not expected:
            best = max(best, float(predicted == expected))
            continue
        common = sum((Counter(predicted) & Counter(expected)).values())
        if common:
            precision, recall = common / len(predicted), common / len(expected)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


# ---------------------------------------------------------------------------------------- VQA accuracy
_VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                    ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_IN_NUMBER = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_VQA_ARTICLES = {"a", "an", "the"}
# The official script's contraction table, entry for entry (GT-Vision-Lab/VQA, vqaEval.py): a word is looked up
# as it is after lower-casing, so only these exact spellings change. It is not "every apostrophe-less form":
# "lets", "shes", "couldntve" and "owsat" are not in it (they stay as typed), "let's" and "she's" map to
# themselves, and "somebody'd" maps to "somebodyd" (the other way round from the rest). The four keys with a
# capital I ("Im", "Ive", "Id've", "I'dve") can never match a lower-cased word, so "im" stays "im" there too.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
# The official script strips periods with ``periodStrip.sub("", text, re.UNICODE)``: the third positional argument
# of ``Pattern.sub`` is ``count``, so at most re.UNICODE == 32 periods are removed. Kept, to score as it does.
_PERIOD_STRIP_COUNT = 32


def normalise_vqa_answer(answer: str) -> str:
    """The official script's answer processing: punctuation, then number words, articles, contractions."""
    text = nfc(answer).replace("\n", " ").replace("\t", " ").strip()
    glued = bool(_DIGIT_COMMA_DIGIT.search(text))
    out = text
    for mark in _VQA_PUNCTUATION:
        # Marks next to a space, or any mark in a text with "1,000"-like numbers, are dropped; others split.
        if mark + " " in text or " " + mark in text or glued:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    out = _PERIOD_NOT_IN_NUMBER.sub("", out, count=_PERIOD_STRIP_COUNT)
    words = [_NUMBER_WORDS.get(word, word) for word in out.lower().split()]
    words = [_CONTRACTIONS.get(word, word) for word in words if word not in _VQA_ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    if not references:
        return 0.0
    answer = normalise_vqa_answer(prediction)
    humans = [normalise_vqa_answer(reference) for reference in references]
    if len(humans) == 1:
        return float(answer == humans[0])
    scores = []
    for left_out in range(len(humans)):
        matches = sum(answer == human for index, human in enumerate(humans) if index != left_out)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


# ------------------------------------------------------------------------------------------------ ANLS
ANLS_THRESHOLD = 0.5


def anls(prediction: str, references: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """ANLS (Biten et al. 2019, ST-VQA, arXiv:1905.13648) as the official RRC evaluation script of DocVQA /
    InfographicVQA computes it (and lmms-eval, which copies it): both answers lower-cased, stripped and their inner
    whitespace collapsed; ``NL = Levenshtein(normalised) / max(len(raw answer), len(raw reference))`` (the lengths
    of the strings as given, before stripping and collapsing, upper-cased as the script measures them, so a
    reference stored with a trailing space is a character longer); ``1 - NL`` kept when it is at least the
    threshold, else 0; best over the references. At ``NL = 0.5`` exactly the score is 0.5, as in the script and in
    pix2struct's ``anls_metric`` (the paper's eq. 1 writes ``NL < 0.5``, which would give 0: "12" against "13"
    scores 0.5 in the script). Text is NFC-composed first (see :func:`nfc`); distances are over code
    points."""
    raw = nfc(prediction)
    answer = " ".join(raw.strip().lower().split())
    best = 0.0
    for reference in references:
        truth_raw = nfc(reference)
        truth = " ".join(truth_raw.strip().lower().split())
        longest = max(len(raw.upper()), len(truth_raw.upper()))
        distance = edit_distance(answer, truth) / longest if longest else 0.0
        if 1.0 - distance >= threshold:
            best = max(best, 1.0 - distance)
    return best


# ------------------------------------------------------------------------------------------------ relaxed accuracy
RELAXED_TOLERANCE = 0.05


def _relaxed_number(text: str) -> float | None:
    """A number as ChartQA's relaxed accuracy reads one: Python's float; text ending in ``%`` has every trailing
    ``%`` removed (``rstrip``, as pix2struct does: "5%%" is 0.05) and is divided by 100."""
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, references: Sequence[str]) -> float:
    """ChartQA's relaxed accuracy (Masry et al. 2022, arXiv:2203.10244, section 5), as pix2struct's
    ``relaxed_correctness`` computes it: when both answers are numbers (and the reference is not 0), right if
    ``|prediction - reference| / |reference| <= 5%``; otherwise a case-insensitive exact match (after NFC and
    stripping). Best over the references."""
    answer = nfc(prediction).strip()
    for reference in references:
        truth = nfc(reference).strip()
        predicted, target = _relaxed_number(answer), _relaxed_number(truth)
        if predicted is not None and target:
            if abs(predicted - target) / abs(target) <= RELAXED_TOLERANCE:
                return 1.0
        elif answer.lower() == truth.lower():
            return 1.0
    return 0.0


# ------------------------------------------------------------------------------------------------ the set
@dataclass(frozen=True)
class Metric:
    """``stats(predictions, references) -> [n, k]`` and ``aggregate(sums [..., k], count) -> [...]``."""

    name: str
    description: str
    stats: Callable[[Sequence[str], Sequence[Sequence[str]]], np.ndarray]
    aggregate: Callable[[np.ndarray, int], np.ndarray]
    needs: str | None = None  # a module the metric imports (an optional extra)

    def sample_scores(self, stats: np.ndarray) -> list[float]:
        return [float(self.aggregate(row, 1)) for row in stats]

    def score(self, stats: np.ndarray) -> float:
        return float(self.aggregate(stats.sum(axis=0), len(stats)))


def _per_sample(function: Callable[[str, Sequence[str]], float]) -> Callable:
    def stats(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
        return np.array([[function(p, r)] for p, r in zip(predictions, references)], dtype=np.float64).reshape(-1, 1)

    return stats


def _mean(sums: np.ndarray, count: int) -> np.ndarray:
    return sums[..., 0] / max(count, 1)


def _field_stats(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
    rows = []
    for prediction, refs in zip(predictions, references):
        rows.append(field_counts(parse_json_answer(prediction), parse_json_answer(refs[0]) if refs else None))
    return np.array(rows, dtype=np.float64).reshape(-1, 3)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 1 where both are 0 (nothing to find and nothing claimed: nothing wrong)."""
    numerator, denominator = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    safe = np.where(denominator == 0, 1.0, denominator)
    return np.where(denominator == 0, np.where(numerator == 0, 1.0, 0.0), numerator / safe)


def _ted(prediction: str, references: Sequence[str]) -> float:
    parsed = parse_json_answer(prediction)
    return max((ted_accuracy(parsed, parse_json_answer(reference)) for reference in references), default=0.0)


def _bleu():
    try:
        from sacrebleu.metrics import BLEU
    except ImportError:
        raise Gemma3VLError(f"the bleu4 metric needs sacrebleu: {EVAL_EXTRA}") from None
    return BLEU(lowercase=True, tokenize="13a", smooth_method="exp")


def bleu_signature(references: Sequence[Sequence[str]] = ()) -> str:
    """sacrebleu's signature of ``bleu4`` on these references. sacrebleu only knows the number of references
    (``nrefs``) after scoring a corpus, and refuses a signature before: it is set here, ``var`` when the
    examples hold different numbers of them, as sacrebleu writes it."""
    bleu = _bleu()
    counts = {max(len(refs), 1) for refs in references}  # no reference is scored as one empty one
    bleu.num_refs = counts.pop() if len(counts) == 1 else -1
    return str(bleu.get_signature())


def _bleu_stats(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
    """Per sample: matching n-gram counts (4), n-gram totals (4), hypothesis length, closest reference
    length; their sums are exactly what sacrebleu's corpus_score sums (on NFC-composed text, like every metric
    here: sacrebleu itself compares code points, so it differs only on text that is not in NFC)."""
    bleu = _bleu()
    rows = []
    for prediction, refs in zip(predictions, references):
        one = bleu.corpus_score([nfc(prediction)], [[nfc(reference)] for reference in refs] or [[""]])
        rows.append([*one.counts, *one.totals, one.sys_len, one.ref_len])
    return np.array(rows, dtype=np.float64).reshape(-1, 10)


def _bleu_aggregate(sums: np.ndarray, count: int) -> np.ndarray:
    from sacrebleu.metrics import BLEU

    flat = np.asarray(sums, dtype=np.float64).reshape(-1, 10)
    scores = [
        BLEU.compute_bleu([int(v) for v in row[0:4]], [int(v) for v in row[4:8]], int(row[8]), int(row[9]),
                          smooth_method="exp").score / 100.0
        for row in flat
    ]
    return np.array(scores).reshape(np.asarray(sums).shape[:-1])


def _canonical_calls(text: str) -> list[str] | None:
    """The calls that end ``text`` (``call_syntax.trailing_calls``: the whole text, or lines of their own after some
    text), each as canonical JSON, sorted; None: no calls."""
    from gemma3vl.infer.call_syntax import trailing_calls

    calls = trailing_calls(text)
    if calls is None:
        return None
    return sorted(json.dumps([name, _whole_numbers(arguments)], sort_keys=True, ensure_ascii=False)
                  for name, arguments in calls)


def _whole_numbers(value):
    """``value`` with whole floats as integers (1.0 is JSON's 1)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_whole_numbers(item) for item in value]
    if isinstance(value, dict):
        return {key: _whole_numbers(item) for key, item in value.items()}
    return value


def tool_call_match(prediction: str, references: Sequence[str]) -> float:
    """For a reference that makes function calls (the ``[name(key=value)]`` turns of tool conversations, as
    ``gemma3vl.infer.tool_calls`` writes them, text before them or not): 1 if the prediction makes the same calls
    (names and argument values equal as JSON, in any order; quoting, spacing, fences and the text before them
    ignored); for a text reference, the normalised exact match. Best over the references."""
    predicted = _canonical_calls(prediction)
    best = 0.0
    for reference in references:
        expected = _canonical_calls(reference)
        if expected is None:
            best = max(best, exact_match(prediction, [reference]))
        elif predicted == expected:
            return 1.0
    return best


METRICS: dict[str, Metric] = {
    metric.name: metric
    for metric in (
        Metric("exact_match", "normalised exact match (SQuAD normalisation), best over references",
               _per_sample(exact_match), _mean),
        Metric("token_f1", "token-overlap F1 (SQuAD), best over references", _per_sample(token_f1), _mean),
        Metric("vqa_accuracy", "VQA accuracy: min(#matches/3, 1) over leave-one-out reference subsets",
               _per_sample(vqa_accuracy), _mean),
        Metric("anls", "ANLS (threshold 0.5), best over references", _per_sample(anls), _mean),
        Metric("relaxed_accuracy", "ChartQA relaxed accuracy: numbers within 5%, else exact (case-insensitive)",
               _per_sample(relaxed_accuracy), _mean),
        Metric("field_f1", "field-level F1 over flattened (key path, value) pairs (micro, as Donut)",
               _field_stats, lambda s, n: _ratio(2 * s[..., 0], s[..., 1] + s[..., 2])),
        Metric("field_precision", "field-level precision (micro)", _field_stats,
               lambda s, n: _ratio(s[..., 0], s[..., 1])),
        Metric("field_recall", "field-level recall (micro)", _field_stats, lambda s, n: _ratio(s[..., 0], s[..., 2])),
        Metric("ted_accuracy", "normalised tree-edit-distance accuracy (Donut)", _per_sample(_ted), _mean),
        Metric("tool_call_match", "the same function calls (names, arguments as JSON, any order); text: exact match",
               _per_sample(tool_call_match), _mean),
        Metric("bleu4", "corpus BLEU-4 (sacrebleu, lower-cased, 13a), 0-1", _bleu_stats, _bleu_aggregate,
               needs="sacrebleu"),
    )
}


def check_metrics(names: Sequence[str]) -> list[str]:
    """The names, checked: known, and their optional packages installed (else a message with the pip line)."""
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise Gemma3VLError(f"unknown metric(s) {', '.join(unknown)}; the metrics are {', '.join(METRICS)} "
                            "(CIDEr-D is not provided: see docs/evaluation.md)")
    for name in names:
        if METRICS[name].needs and not metric_available(name):
            raise Gemma3VLError(f"the {name} metric needs {METRICS[name].needs}: {EVAL_EXTRA}")
    return list(dict.fromkeys(names))


def metric_available(name: str) -> bool:
    needs = METRICS[name].needs
    if needs is None:
        return True
    import importlib.util

    return importlib.util.find_spec(needs) is not None


def compute_stats(names: Sequence[str], predictions: Sequence[str],
                  references: Sequence[Sequence[str]]) -> dict[str, np.ndarray]:
    """name -> [n, k] statistics of every sample (``Metric.score`` / ``sample_scores`` read them)."""
    if len(predictions) != len(references):
        raise Gemma3VLError(f"{len(predictions)} predictions for {len(references)} reference lists")
    return {name: METRICS[name].stats(predictions, references) for name in names}


def score(name: str, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """One metric over a whole set (the convenience the trainer and tests use)."""
    check_metrics([name])
    return METRICS[name].score(METRICS[name].stats(predictions, references))
