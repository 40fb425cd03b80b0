"""Evaluation metrics: VQA accuracy (the official VQA evaluation's rule) and the COCO caption metrics."""

import re
import shutil
import threading
from collections import Counter

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

# ---------------------------------------------------------------- VQA accuracy

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = ';/[]"{}()=+\\_->@<`,?!'  # periods are handled separately; apostrophes stay
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")

# The official contractions table maps a contraction written with one apostrophe missing to
# its full form ("dont" -> "don't", "couldnt've" -> "couldn't've"). We derive those keys from
# the full forms below; the result equals every official entry that can ever fire. (Its
# entries keyed by a capital "I" never match because words are lowercased first, and "let's"
# and "she's" map to themselves.) The official table also has one entry backwards:
# "somebody'd" -> "somebodyd", which we keep so scores stay identical.
_FULL_CONTRACTIONS = """
    ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've
    hasn't haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am
    mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at
    shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll somebody's
    someone'd someone'd've someone'll someone's something'd something'd've something'll
    that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas
    wasn't we'd've we've weren't what'll what're what's what've when's where'd where's
    where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't
    wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()
_CONTRACTIONS = {
    full[:i] + full[i + 1:]: full
    for full in _FULL_CONTRACTIONS
    for i, char in enumerate(full)
    if char == "'"
}
_CONTRACTIONS["somebody'd"] = "somebodyd"


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
    # Each mark is deleted everywhere if it sits next to a space anywhere in the text, or if the
    # text holds a digit,digit group ("1,000" -> "1000"); otherwise every occurrence becomes a
    # space ("black/white" -> "black white"). Both tests look at the input, not the edited text.
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        touches_space = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if delete_all or touches_space else " ")
    # A period goes unless a digit follows ("3.5" stays). The official pattern meant to spare
    # periods after a digit too, but its look-behind is mistyped as a look-ahead and never
    # applies; it also passes re.UNICODE (32) where re.sub expects a count,
    # so at most 32 periods are removed.
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=32)


def _process_digit_article(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """Normalise a predicted VQA answer exactly as the official VQA evaluation does.

    Newlines/tabs become spaces and the ends are stripped; punctuation is removed or turned
    into spaces; the text is lowercased; number words become digits ("two" -> "2",
    "none" -> "0"); the articles a/an/the are dropped; contractions missing an apostrophe are
    repaired ("dont" -> "don't"). Words are re-joined with single spaces.
    """
    return _process_digit_article(_process_punctuation(_clean(answer)))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy of one predicted answer against its reference answers, in [0, 1].

    With 10 references this is the official number (the VQA evaluation's vqaEval.py, quirks
    included): for each reference i, count the OTHER references equal to the prediction, score
    min(1, count / 3), and average over i (so 3 matching references give 0.9, 4 or more 1.0).
    The prediction is always normalised (`normalize_answer`). The references are compared as
    they are when all of them agree, and only have their punctuation processed when they differ:
    they are never lowercased, stripped or given digits for number words, because the official
    annotations already are in that form. So "Two." scores 1.0 against ten "2", while a
    reference written "Two" or "two" can never be matched.

    Generalisation to fewer references (ours, not official): with k references the threshold
    is min(3, k - 1) instead of 3, which is the official rule for k >= 4; with k = 2 the
    prediction earns 0.5 per matching reference. With a single reference, leave-one-out
    would always give 0, so the score is instead an exact match (1.0 / 0.0) after
    normalising both sides.
    """
    if isinstance(answers, str) or not answers:
        raise ValueError("vqa_accuracy needs a non-empty list of reference answers")
    prediction = normalize_answer(prediction)
    if len(answers) == 1:
        return float(prediction == normalize_answer(answers[0]))
    if len(set(answers)) > 1:
        answers = [_process_punctuation(answer) for answer in answers]
    threshold = min(3, len(answers) - 1)
    matches = [answer == prediction for answer in answers]
    n_matches = sum(matches)
    return sum(min(1.0, (n_matches - own) / threshold) for own in matches) / len(answers)


def accuracy_by(scored) -> dict[str, float]:
    """Mean score per key from (key, score) pairs: per question type or answer type, as the official
    perQuestionType / perAnswerType (fractions here, not percentages)."""
    groups: dict[str, list[float]] = {}
    for key, value in scored:
        groups.setdefault(key, []).append(value)
    return {key: sum(values) / len(values) for key, values in sorted(groups.items())}


def majority_floor_by_type(examples) -> dict[str, float]:
    """Per question type, the VQA accuracy of always giving the answer that scores best on that type: what a model
    that ignores the image and knows only the type gets. The candidates are the type's 20 most frequent targets."""
    by_type: dict[str, list] = {}
    for example in examples:
        by_type.setdefault(example.question_type, []).append(example.answers)
    floors = {}
    for qtype, answer_lists in sorted(by_type.items()):
        targets = Counter(normalize_answer(answers[0]) for answers in answer_lists)
        floors[qtype] = max(sum(vqa_accuracy(candidate, answers) for answers in answer_lists) / len(answer_lists)
                            for candidate, _ in targets.most_common(20))
    return floors


def family_average(by_family: dict[str, float], caption: dict | None) -> float | None:
    """The Idefics2 study's average of its four evaluations, divided by 100: the VQA accuracy of each family
    present (general, text, knowledge; fractions) and the captions' CIDEr as the COCO evaluation prints it."""
    scores = [by_family[f] for f in ("general", "text", "knowledge") if by_family.get(f) is not None]
    if caption and caption.get("CIDEr") is not None:
        scores.append(caption["CIDEr"])
    return sum(scores) / len(scores) if scores else None


# ------------------------------------------------------------ caption metrics

# Stands in for predictions that are empty after tokenisation (see caption_metrics). It must
# match no reference word under METEOR's stemming, synonyms or paraphrases.
_EMPTY_PREDICTION = "emptyprediction"


class JavaNotFoundError(RuntimeError):
    """Raised when caption metrics are requested but no `java` executable is on PATH."""


def _one_line(text: str) -> str:
    # The tokenizer writes one caption per line and reads them back by position; a stray
    # "\r" (or any other line break) would shift every later caption onto the wrong example.
    return " ".join(text.split())


def _tokenize(predictions: dict, references: dict) -> tuple[dict, dict]:
    """PTB-tokenise both sides as the COCO evaluation does, in pycocoevalcap's format."""
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize(
        {key: [{"caption": _one_line(ref)} for ref in refs] for key, refs in references.items()}
    )
    res = tokenizer.tokenize(
        {key: [{"caption": _one_line(pred)}] for key, pred in predictions.items()}
    )
    return gts, {key: [caps[0] or _EMPTY_PREDICTION] for key, caps in res.items()}


def _stop(meteor: Meteor) -> None:
    # Meteor stops its JVM only in __del__, which first takes a lock that compute_score leaves
    # held if it fails part-way (e.g. the JVM died); that would hang the garbage collector.
    # Kill the process ourselves and give __del__ a fresh lock.
    meteor.meteor_p.kill()
    meteor.meteor_p.wait()
    meteor.lock = threading.Lock()


def caption_metrics(predictions: dict, references: dict) -> dict:
    """COCO caption metrics of `predictions` (id -> caption) against `references` (id -> list
    of captions), computed with pycocoevalcap exactly as the COCO caption evaluation does.

    Both sides are PTB-tokenised, then scored with BLEU-1..4, METEOR, ROUGE-L and CIDEr
    (CIDEr-D as pycocoevalcap implements it). Returns those seven keys as plain floats,
    unscaled (e.g. CIDEr 0.85, not 85). SPICE is not computed.

    CIDEr takes its document frequencies from the references given here, so CIDEr on a
    subset is not comparable with CIDEr on the full set (and a single example always gets 0).

    A prediction that is empty after tokenisation ("", or only punctuation) is scored as one
    placeholder word that matches nothing, i.e. as a complete miss by every metric. Left
    empty, it would simply add nothing to METEOR's corpus statistics (and can then score
    higher than a partly right caption).

    Needs Java: the tokenizer and METEOR run as Java subprocesses. METEOR's start-up (loading
    its paraphrase table) takes several seconds and dominates the run time; it overlaps with
    tokenisation and the other metrics, and the process is always killed before returning.
    """
    unmatched = predictions.keys() ^ references.keys()
    if unmatched:
        raise ValueError(f"example id {next(iter(unmatched))!r} is not in both "
                         "predictions and references")
    if not predictions:
        raise ValueError("caption_metrics needs at least one example")
    for key, refs in references.items():
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{key!r}] must be a non-empty list of captions")
    if shutil.which("java") is None:
        raise JavaNotFoundError(
            "caption metrics need Java on PATH (e.g. `apt-get install default-jre`)")

    meteor = Meteor()  # started first so its slow start-up overlaps with the work below
    try:
        gts, res = _tokenize(predictions, references)
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        rouge, _ = Rouge().compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
        meteor_score, _ = meteor.compute_score(gts, res)
    finally:
        _stop(meteor)
    scores = dict(zip(["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"], bleu))
    scores.update({"METEOR": meteor_score, "ROUGE-L": rouge, "CIDEr": cider})
    return {name: float(value) for name, value in scores.items()}
