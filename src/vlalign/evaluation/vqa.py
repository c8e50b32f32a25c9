"""VQA evaluation: the official VQA accuracy with its answer normalisation, and answer-list ranking.

**Accuracy** (docs/tasks.md, VQA): the rule of the official VQA evaluation script, which the EvalAI server applies.
The predicted answer is cleaned (newlines and tabs become spaces, surrounding spaces stripped) and normalised:
:func:`process_punctuation` (punctuation removed or turned into spaces, a period kept only before a digit) then
:func:`process_digit_article` (lower case, number words ``none``/``zero``..``ten`` to digits, articles ``a an
the`` dropped, apostrophe-less contractions such as ``dont`` restored). The human answers are used as they are,
punctuation-normalised only when they are not all identical (the script's rule). Each of the (usually 10) human
answers is left out in turn and the prediction scores ``min(1, #matches among the others / 3)``; the question's
accuracy is the mean over the leave-one-out subsets, the split's the mean over questions (×100 in reports).

**Ranking** (:func:`rank_answers`): VQA answers are chosen from a fixed answer list, not generated freely. The answer
decoder is run once on ``[CLS]`` to get every answer's first-token log-probability; the ``k`` best answers by it are
teacher-forced in full, and each is scored by its sequence log-probability ``Σ_t log p(token_t | tokens_<t,
question)`` over its tokens (first answer token … ``[SEP]``), every token counted once. The reference adds the
first token's log-probability a second time; ``reference_scoring=True`` reproduces that (docs/differences.md row 24).

Everything here is pure tensor / string code; :func:`rank_answers` takes the decoder as a callable.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ARTICLES",
    "CONTRACTIONS",
    "NUMBER_WORDS",
    "PUNCTUATION",
    "RankedAnswers",
    "answer_weights",
    "constant_answer_accuracy",
    "majority_answer",
    "normalize_answer",
    "place_predictions",
    "prior_answers",
    "process_digit_article",
    "process_punctuation",
    "question_accuracy",
    "rank_answers",
    "sequence_log_probs",
    "token_log_probs",
    "vqa_accuracy",
]

# -- answer normalisation (the official script's tables) -------------------------------------------------------------
#: Characters the script removes (when next to a space, or when the text has a digit-comma-digit) or else turns into
#: a space.
PUNCTUATION: tuple[str, ...] = tuple(';/[]"{}()=+\\_-><@`,?!')
#: Number words the script maps to digits.
NUMBER_WORDS: dict[str, str] = {
    word: str(value)
    for value, word in enumerate(
        ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
    )
} | {"none": "0"}
#: Words the script drops.
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
#: Contractions written without their apostrophe, restored by the script (the entries with capitals never match a
#: lower-cased word; they are kept so the table is the script's).
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
# A period not followed by a digit. The script's pattern also has "(?!<=\d)" in front, a look-ahead (meant as a
# look-behind) that only excludes a literal "<=" and a digit after the period; kept for identical results.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The script passes re.UNICODE (32) where re.sub takes its count: at most 32 periods are removed.
_PERIOD_COUNT = 32


def process_punctuation(text: str) -> str:
    """The script's punctuation step: each character of :data:`PUNCTUATION` is deleted when it touches a space in
    ``text`` (or ``text`` has a digit-comma-digit such as ``1,000``), else replaced by a space; then periods not
    followed by a digit are deleted."""
    out = text
    digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in PUNCTUATION:
        if f"{mark} " in text or f" {mark}" in text or digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """The script's word step: lower case, split on whitespace, number words to digits, articles dropped,
    contractions restored, words joined by single spaces."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(text: str) -> str:
    """A predicted answer as the script compares it: tabs and newlines to spaces, stripped, punctuation and words
    normalised (``"Two dogs!"`` -> ``"2 dogs"``, ``"the dont"`` -> ``"don't"``)."""
    return process_digit_article(process_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))


def question_accuracy(prediction: str, answers: Sequence[str], normalized: bool = False) -> float:
    """The VQA accuracy of one prediction against the human ``answers`` of its question, in [0, 1].

    ``min(1, #(other answers equal to the prediction) / 3)`` averaged over leaving each answer out in turn; the
    prediction is normalised (:func:`normalize_answer`, skipped when ``normalized``) and the human answers are
    punctuation-normalised when they are not all identical (the official rule). No answers: 0.
    """
    if not answers:
        return 0.0
    predicted = prediction if normalized else normalize_answer(prediction)
    humans = list(answers)
    if len(set(humans)) > 1:
        humans = [process_punctuation(answer) for answer in humans]
    matches = sum(answer == predicted for answer in humans)
    # leaving out answer i: the others match (matches - [answer_i matches]) times
    total = sum(min(1.0, (matches - (answer == predicted)) / 3.0) for answer in humans)
    return total / len(humans)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Mean :func:`question_accuracy` over questions, ×100 (the number VQA papers report)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
    if not predictions:
        raise ValueError("no questions to score")
    return 100.0 * sum(question_accuracy(p, a) for p, a in zip(predictions, answers, strict=True)) / len(predictions)


def majority_answer(answers: Sequence[Sequence[str]]) -> str:
    """The most frequent normalised human answer over all questions (ties: the first seen), the usual chance
    level of VQA: always answering it scores :func:`constant_answer_accuracy`."""
    counts = Counter(normalize_answer(answer) for question in answers for answer in question)
    if not counts:
        raise ValueError("no human answers")
    return counts.most_common(1)[0][0]


def constant_answer_accuracy(answer: str, answers: Sequence[Sequence[str]]) -> float:
    """VQA accuracy (×100) of answering ``answer`` to every question."""
    return vqa_accuracy([answer] * len(answers), answers)


def prior_answers(answers: Sequence[Sequence[str]], groups: Sequence[str]) -> dict[str, str]:
    """The most frequent normalised human answer of each group of questions (e.g. per ``question_type``): answering
    it without looking at the image is the language-prior baseline."""
    if len(answers) != len(groups):
        raise ValueError(f"{len(answers)} answer lists for {len(groups)} groups")
    members: dict[str, list[Sequence[str]]] = {}
    for group, human in zip(groups, answers, strict=True):
        members.setdefault(group, []).append(human)
    return {group: majority_answer(humans) for group, humans in members.items()}


def answer_weights(answers: Sequence[str]) -> tuple[list[str], list[float]]:
    """The training targets of one VQA v2 question: its distinct human answers (in order of first appearance) and
    their weights ``count / len(answers)``, which sum to 1 (the reference's answer weighting)."""
    if not answers:
        raise ValueError("a question needs at least one answer")
    counts = Counter(answers)
    distinct = list(dict.fromkeys(answers))
    return distinct, [counts[answer] / len(answers) for answer in distinct]


def place_predictions(index: Tensor, best: Tensor, count: int) -> Tensor:
    """Predictions gathered from every process, put back in file order: ``[count]`` long, ``-1`` where a question
    was not evaluated. A distributed sampler pads the last shard with repeats of earlier questions; a repeat lands
    on its question's own slot, so every question keeps exactly one answer (the reference's result file can list a
    question twice)."""
    if index.shape != best.shape or index.dim() != 1:
        raise ValueError(f"index and best must be 1-D of one length, got {tuple(index.shape)} and {tuple(best.shape)}")
    placed = torch.full((count,), -1, dtype=torch.long)
    placed[index.long().cpu()] = best.long().cpu()
    return placed


# -- answer-list ranking ---------------------------------------------------------------------------------------------
def token_log_probs(logits: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """Teacher-forced log-probabilities of every target token: ``[N, L-1]``, entry ``t`` is ``log p(ids[:, t+1] |
    ids[:, :t+1])`` from ``logits[:, t]``, 0 where ``mask[:, t+1]`` is 0 (padding).

    ``logits`` [N, L, V] are the decoder's outputs for the inputs ``ids`` [N, L] (``[CLS] answer [SEP] [PAD]...``).
    Computed as the target's logit minus the log-sum-exp, without a second [N, L, V] tensor.
    """
    shifted = logits[:, :-1].float()
    targets = ids[:, 1:]
    picked = shifted.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - shifted.logsumexp(-1)
    return picked * mask[:, 1:].to(picked.dtype)


def sequence_log_probs(logits: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """``log p(answer)`` per row [N]: the sum of :func:`token_log_probs`, each target token counted once."""
    return token_log_probs(logits, ids, mask).sum(-1)


@dataclass
class RankedAnswers:
    """What :func:`rank_answers` found for ``Q`` questions.

    Attributes:
        best: the chosen answer-list index per question, long [Q].
        candidates: the ``k`` answers kept by their first-token probability, long [Q, k] (best first).
        first_log_prob: their first-token log-probabilities [Q, k].
        scores: the scores they were ranked by [Q, k] (sequence log-probabilities; plus the first token's once more
            under the reference scoring).
    """

    best: Tensor
    candidates: Tensor
    first_log_prob: Tensor
    scores: Tensor


#: ``decode(question_rows [N], answer_ids [N, L], answer_mask [N, L]) -> logits [N, L, V]``: the answer decoder on
#: answers of the questions ``question_rows`` (rows of the question batch being ranked).
Decode = Callable[[Tensor, Tensor, Tensor], Tensor]


@torch.no_grad()
def rank_answers(
    decode: Decode,
    num_questions: int,
    answer_ids: Tensor,
    answer_mask: Tensor,
    k: int,
    reference_scoring: bool = False,
    chunk_size: int | None = None,
) -> RankedAnswers:
    """Pick each question's answer from the answer list (the reference's two-stage ranking).

    1. ``decode`` on ``[CLS]`` alone gives the first-step distribution; every answer's first token
       (``answer_ids[:, 1]``) gets its log-probability and the ``k`` best answers are kept (``k`` capped by the list).
    2. Those ``Q·k`` answers are teacher-forced in full (in chunks of ``chunk_size`` rows) and scored by
       :func:`sequence_log_probs`; with ``reference_scoring`` the first token's log-probability is added once more,
       as the reference does (docs/differences.md row 24).
    3. The best-scoring candidate wins (ties: the one with the higher first-token probability).

    With ``k`` covering the whole list this is exactly the arg-max of every answer's sequence log-probability.

    Args:
        decode: the decoder on given question rows (see :data:`Decode`).
        num_questions: ``Q``, the number of question rows ``decode`` can be asked about.
        answer_ids: the tokenised answer list ``[A, L]``: ``[CLS] answer [SEP]``, right-padded.
        answer_mask: its attention mask ``[A, L]``.
        k: candidates kept after the first step.
        reference_scoring: count the first token twice (the reference's scores).
        chunk_size: candidate rows per decoder call (None: all ``Q·k`` at once).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if answer_ids.dim() != 2 or answer_ids.shape[1] < 2 or answer_ids.shape != answer_mask.shape:
        raise ValueError(
            f"answer_ids and answer_mask must both be [A, L >= 2] ([CLS] answer ...), got {tuple(answer_ids.shape)} "
            f"and {tuple(answer_mask.shape)}"
        )
    device = answer_ids.device
    count = answer_ids.shape[0]
    k = min(k, count)
    rows = torch.arange(num_questions, device=device)
    start = answer_ids[:1, :1].expand(num_questions, 1)
    first_logits = decode(rows, start, torch.ones_like(start))[:, 0].float()  # [Q, V]
    first = first_logits.log_softmax(-1).index_select(1, answer_ids[:, 1])  # [Q, A]
    first_log_prob, candidates = first.topk(k, dim=1)  # [Q, k]

    flat = candidates.reshape(-1)
    ids, mask = answer_ids.index_select(0, flat), answer_mask.index_select(0, flat)
    width = int(mask.sum(1).max())  # the longest chosen answer: no decoder work on all-padding columns
    ids, mask = ids[:, :width], mask[:, :width]
    owner = rows.repeat_interleave(k)
    step = chunk_size or ids.shape[0]
    pieces = [
        sequence_log_probs(decode(owner[i : i + step], ids[i : i + step], mask[i : i + step]), ids[i : i + step],
                           mask[i : i + step])
        for i in range(0, ids.shape[0], step)
    ]  # fmt: skip
    scores = torch.cat(pieces).view(num_questions, k)
    if reference_scoring:
        scores = scores + first_log_prob
    best = candidates.gather(1, scores.argmax(1, keepdim=True)).squeeze(1)
    return RankedAnswers(best=best, candidates=candidates, first_log_prob=first_log_prob, scores=scores)
