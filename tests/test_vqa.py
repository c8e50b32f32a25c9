"""VQA: the official accuracy and answer normalisation against hand computation, answer-list ranking against brute
force, the answer decoder's initialisation from the stream, the weighted loss, the data in the public layout (bad
entries skipped and counted in training, named in evaluation), the synthetic files, and `vlalign finetune vqa` /
`vlalign evaluate vqa` end to end on a tiny model (results.json, a submission without duplicates)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from vlalign.cli.main import main
from vlalign.data.preprocessing import Preprocessing, tokenizer_files
from vlalign.data.tokenization import load_tokenizer, vocab_info
from vlalign.datamodules.vqa import (
    VQAEvalDataset,
    VQATrainCollate,
    VQATrainDataset,
    load_answer_list,
    pre_question,
    spell_out_numbers,
    tokenize_answers,
)
from vlalign.errors import InputFileError
from vlalign.evaluation.vqa import (
    answer_weights,
    constant_answer_accuracy,
    majority_answer,
    normalize_answer,
    place_predictions,
    prior_answers,
    question_accuracy,
    rank_answers,
    vqa_accuracy,
)
from vlalign.models.answer_decoder import (
    AnswerDecoder,
    answer_loss,
    decoder_config,
    decoder_init_state,
    decoder_layer_map,
)
from vlalign.models.heads import MaskedLMHead
from vlalign.models.stream import SingleStreamTransformer, StreamConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = CONFIGS / "finetune" / "vqa_tiny.yaml"


# -- accuracy and normalisation ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),  # number words to digits, lower case
        ("none", "0"),
        ("the red one", "red 1"),  # article dropped
        ("an apple", "apple"),
        ("dont", "don't"),  # contraction restored
        ("yes.", "yes"),  # period not before a digit
        ("3.5", "3.5"),  # period before a digit kept
        ("1,000", "1000"),  # digit-comma-digit: every punctuation mark deleted
        ("red/blue", "red blue"),  # a mark touching no space becomes a space
        ("hello ?", "hello"),  # a mark next to a space is deleted
        ("x-ray\tmachine\n", "x ray machine"),  # tabs and newlines, then the hyphen
    ],
)
def test_answer_normalisation_follows_the_official_script(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("yes", ["yes"] * 10, 1.0),  # 9 matches in every leave-one-out subset
        # 2 red: leaving a red out leaves 1 match (1/3), leaving a blue out 2 (2/3): (2/3 + 16/3) / 10
        ("red", ["red"] * 2 + ["blue"] * 8, 0.6),
        ("red", ["red"] * 3 + ["blue"] * 7, (3 * 2 / 3 + 7 * 1) / 10),  # 0.9
        ("red", ["red"] * 4 + ["blue"] * 6, 1.0),
        ("red", ["red"] + ["blue"] * 9, 9 * (1 / 3) / 10),  # 0.3
        ("green", ["red"] * 5 + ["blue"] * 5, 0.0),
        ("Red!", ["red"] * 2 + ["blue"] * 8, 0.6),  # the prediction is normalised
        ("two", ["2"] * 5 + ["two"] * 5, 1.0),  # "two" -> "2" matches the five "2"s in every subset
        ("2", ["two"] * 10, 0.0),  # identical human answers are not normalised at all (the official rule)
        ("yes", ["yes."] * 3 + ["no"] * 7, 0.9),  # differing human answers are punctuation-normalised
    ],
)
def test_question_accuracy_equals_hand_computation(prediction: str, answers: list[str], expected: float) -> None:
    assert question_accuracy(prediction, answers) == pytest.approx(expected)


def test_split_accuracy_majority_and_weights() -> None:
    answers = [["red"] * 2 + ["blue"] * 8, ["yes"] * 10, ["2"] * 4 + ["3"] * 6]
    assert vqa_accuracy(["red", "yes", "two"], answers) == pytest.approx(100 * (0.6 + 1.0 + 1.0) / 3)
    assert majority_answer(answers) == "yes"  # 10 yes vs 8 blue
    assert constant_answer_accuracy("yes", answers) == pytest.approx(100 / 3)
    groups = ["is there", "is there", "is there", "how many"]
    humans = [["yes"] * 10, ["no"] * 6 + ["yes"] * 4, ["no"] * 10, ["two"] * 10]
    assert prior_answers(humans, groups) == {"is there": "no", "how many": "2"}  # 16 no to 14 yes; normalised
    distinct, weights = answer_weights(["red"] * 6 + ["orange"] * 3 + ["pink"])
    assert distinct == ["red", "orange", "pink"] and weights == pytest.approx([0.6, 0.3, 0.1])


def test_padding_repeats_leave_one_prediction_per_question() -> None:
    # two ranks of a 5-question split: the sampler padded rank 1's shard with question 0 again
    index = torch.tensor([0, 2, 4, 1, 3, 0])
    best = torch.tensor([7, 9, 11, 8, 10, 7])
    assert place_predictions(index, best, 5).tolist() == [7, 8, 9, 10, 11]
    assert place_predictions(torch.tensor([1]), torch.tensor([3]), 3).tolist() == [-1, 3, -1]


# -- ranking -------------------------------------------------------------------------------------------------------
def _tiny_decoder(vocab: int = 23, layers: int = 2, seed: int = 0) -> AnswerDecoder:
    torch.manual_seed(seed)
    stream = StreamConfig(
        vocab_size=vocab, hidden_size=16, num_layers=4, num_heads=2, intermediate_size=32,
        max_position_embeddings=16, hidden_dropout=0.0, attention_dropout=0.0, encoder_width=16,
    )  # fmt: skip
    return AnswerDecoder(decoder_config(stream, layers)).eval()


def _answer_list(vocab: int, count: int, seed: int = 1) -> list[list[int]]:
    """Distinct answers of 1-3 tokens from ids 5.. (0-4 special: [PAD] 0, [CLS] 2, [SEP] 3)."""
    g = torch.Generator().manual_seed(seed)
    answers: list[list[int]] = []
    while len(answers) < count:
        length = int(torch.randint(1, 4, (1,), generator=g))
        answer = torch.randint(5, vocab, (length,), generator=g).tolist()
        if answer not in answers:
            answers.append(answer)
    return answers


def _padded(answers: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [[2, *a, 3] for a in answers]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    return ids, (ids != 0).long()


def _brute_force(decoder: AnswerDecoder, states: torch.Tensor, answers: list[list[int]]) -> torch.Tensor:
    """log p(answer | question) of every pair, one unpadded pair at a time, summed token by token."""
    scores = torch.zeros(states.shape[0], len(answers))
    for q in range(states.shape[0]):
        for a, answer in enumerate(answers):
            ids = torch.tensor([[2, *answer, 3]])
            log_probs = decoder(ids, torch.ones_like(ids), states[q : q + 1], None)[0].log_softmax(-1)
            scores[q, a] = sum(float(log_probs[t, ids[0, t + 1]]) for t in range(ids.shape[1] - 1))
    return scores


@torch.no_grad()
def test_ranking_with_k_covering_the_list_equals_brute_force_scoring() -> None:
    decoder = _tiny_decoder()
    answers = _answer_list(23, 9)
    ids, mask = _padded(answers)
    states = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(3))

    def decode(rows: torch.Tensor, a_ids: torch.Tensor, a_mask: torch.Tensor) -> torch.Tensor:
        return decoder(a_ids, a_mask, states.index_select(0, rows), None)

    brute = _brute_force(decoder, states, answers)
    ranked = rank_answers(decode, 4, ids, mask, k=len(answers), chunk_size=7)
    assert ranked.best.tolist() == brute.argmax(1).tolist()
    # the scores are the brute-force log-probabilities of the candidates
    torch.testing.assert_close(ranked.scores, brute.gather(1, ranked.candidates), atol=1e-5, rtol=1e-5)
    # the reference adds the first token's log-probability once more
    first = torch.stack([_first_token_log_prob(decoder, states, answer) for answer in answers], dim=1)
    reference = rank_answers(decode, 4, ids, mask, k=len(answers), reference_scoring=True)
    assert reference.best.tolist() == (brute + first).argmax(1).tolist()
    torch.testing.assert_close(reference.scores - reference.first_log_prob, ranked.scores, atol=1e-5, rtol=1e-5)


def _first_token_log_prob(decoder: AnswerDecoder, states: torch.Tensor, answer: list[int]) -> torch.Tensor:
    start = torch.full((states.shape[0], 1), 2)
    return decoder(start, torch.ones_like(start), states, None)[:, 0].log_softmax(-1)[:, answer[0]]


def _bigram(table: dict[int, dict[int, float]], vocab: int = 8):
    """A decoder whose next-token distribution depends on the current token only (``table[token][next] = p``)."""
    logits = torch.full((vocab, vocab), -30.0)
    for token, row in table.items():
        for following, p in row.items():
            logits[token, following] = math.log(p)

    def decode(rows: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return logits[ids]

    return decode


def test_reference_scoring_counts_the_first_token_twice_and_can_pick_another_answer() -> None:
    # answers 0: [CLS] 5 [SEP], 1: [CLS] 6 [SEP]; p(5)=0.3, p(SEP|5)=0.5; p(6)=0.6, p(SEP|6)=0.2 (hand computed)
    decode = _bigram({2: {5: 0.3, 6: 0.6, 7: 0.1}, 5: {3: 0.5, 7: 0.5}, 6: {3: 0.2, 7: 0.8}})
    ids = torch.tensor([[2, 5, 3], [2, 6, 3]])
    mask = torch.ones_like(ids)
    once = rank_answers(decode, 1, ids, mask, k=2)
    twice = rank_answers(decode, 1, ids, mask, k=2, reference_scoring=True)
    # once: log .3 + log .5 = -1.897 beats log .6 + log .2 = -2.120; twice: -3.101 loses to -2.631
    assert once.best.item() == 0 and twice.best.item() == 1
    by_answer = dict(zip(once.candidates[0].tolist(), once.scores[0].tolist(), strict=True))
    assert by_answer[0] == pytest.approx(math.log(0.3) + math.log(0.5), abs=1e-5)
    assert by_answer[1] == pytest.approx(math.log(0.6) + math.log(0.2), abs=1e-5)
    # k = 1 keeps only the most probable first token
    assert rank_answers(decode, 1, ids, mask, k=1).best.item() == 1


# -- the decoder ---------------------------------------------------------------------------------------------------
def test_decoder_layer_map_is_the_reference_mapping_for_bert_base() -> None:
    assert decoder_layer_map(12, 6) == {0: 6, 1: 7, 2: 8, 3: 9, 4: 10, 5: 11}
    with pytest.raises(ValueError, match="decoder_layers must be in"):
        decoder_layer_map(4, 5)


def test_decoder_starts_from_the_top_stream_layers_embeddings_and_mlm_head() -> None:
    torch.manual_seed(0)
    config = StreamConfig(vocab_size=30, hidden_size=16, num_layers=4, num_heads=2, intermediate_size=32,
                          max_position_embeddings=16, encoder_width=16)  # fmt: skip
    stream = SingleStreamTransformer(config)
    head = MaskedLMHead(config, stream.embeddings.word_embeddings)
    torch.nn.init.normal_(head.bias)
    decoder = AnswerDecoder(decoder_config(config, 2))
    state, missing = decoder_init_state(decoder, stream.state_dict(), 4, head.state_dict())
    decoder.load_state_dict(state, strict=False)
    assert missing == []
    for k, source in ((0, 2), (1, 3)):
        mine, theirs = decoder.encoder.layer[k], stream.encoder.layer[source]
        for name, value in theirs.state_dict().items():  # self-attention, cross-attention, FFN
            assert torch.equal(mine.state_dict()[name], value), (k, name)
    assert torch.equal(decoder.embeddings.position_embeddings.weight, stream.embeddings.position_embeddings.weight)
    assert torch.equal(decoder.head.transform.dense.weight, head.transform.dense.weight)
    assert torch.equal(decoder.head.bias, head.bias)
    assert decoder.head.decoder.weight is decoder.embeddings.word_embeddings.weight  # tied, as BERT's LM head
    assert torch.equal(decoder.head.decoder.weight, stream.embeddings.word_embeddings.weight)
    assert decoder.embeddings.word_embeddings.weight.data_ptr() != stream.embeddings.word_embeddings.weight.data_ptr()


def test_decoder_cross_attention_keys_start_fresh_when_the_widths_differ() -> None:
    config = StreamConfig(vocab_size=30, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                          max_position_embeddings=16, encoder_width=24)  # fmt: skip
    stream = SingleStreamTransformer(config)
    decoder = AnswerDecoder(decoder_config(config, 1))
    _, missing = decoder_init_state(decoder, stream.state_dict(), 2, None)
    width_bound = {f"encoder.layer.0.crossattention.self.{p}.weight" for p in ("key", "value")}
    assert width_bound <= set(missing)
    assert all(key.startswith("head.") or key in width_bound for key in missing)  # everything else copied


@torch.no_grad()
def test_decoder_is_causal() -> None:
    decoder = _tiny_decoder()
    states = torch.randn(1, 3, 16)
    ids = torch.tensor([[2, 7, 8, 3]])
    changed = torch.tensor([[2, 7, 9, 3]])
    a = decoder(ids, torch.ones_like(ids), states, None)
    b = decoder(changed, torch.ones_like(ids), states, None)
    torch.testing.assert_close(a[:, :2], b[:, :2])
    assert not torch.allclose(a[:, 2], b[:, 2])


def test_answer_loss_equals_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 3, 6, generator=g)
    teacher = torch.randn(3, 3, 6, generator=g)
    ids = torch.tensor([[2, 4, 3], [2, 5, 3], [2, 3, 0]])  # the third answer is one token shorter (padded)
    mask = (ids != 0).long()
    weights = torch.tensor([0.7, 0.3, 1.0])
    alpha = 0.4

    def by_hand(use_teacher: bool) -> float:
        total = 0.0
        for a in range(3):
            loss_a = 0.0
            for t in range(2):
                if not mask[a, t + 1]:
                    continue
                log_p = logits[a, t].log_softmax(-1)
                nll = -float(log_p[ids[a, t + 1]])
                soft = -float((teacher[a, t].softmax(-1) * log_p).sum())
                loss_a += (1 - alpha) * nll + alpha * soft if use_teacher else nll
            total += float(weights[a]) * loss_a
        return total / 2  # two questions

    assert float(answer_loss(logits, ids, mask, weights, 2)) == pytest.approx(by_hand(False), rel=1e-5)
    assert float(answer_loss(logits, ids, mask, weights, 2, teacher, alpha)) == pytest.approx(by_hand(True), rel=1e-5)


# -- data ----------------------------------------------------------------------------------------------------------
def _entry(qid: int, image: str, question: str = "what colour is the circle?", answer=None, **extra) -> dict:
    answers = ["red"] * 10 if answer is None else answer
    return {"question_id": qid, "question": question, "answer": answers, "image": image, "dataset": "vqa", **extra}


def test_training_entries_bad_ones_are_skipped_and_counted(synth_data: Path, tmp_path: Path) -> None:
    from vlalign.data.transforms import AugmentConfig, PretrainTransform

    image = sorted((synth_data / "images" / "train").glob("*.jpg"))[0].name
    entries = [
        _entry(1, image, answer=["red"] * 6 + ["orange"] * 3 + ["pink"]),
        {"question": "how many shapes are there?", "answer": "2", "image": image, "dataset": "vg"},
        _entry(3, "gone.jpg"),  # no such file
        {"question_id": 4, "question": "is it red?", "answer": ["yes"] * 10},  # no image
        _entry(5, image, question="  ?  "),  # nothing left after cleaning
        _entry(6, image, answer=[]),  # no answers
    ]
    train = tmp_path / "train.json"
    train.write_text(json.dumps(entries))
    root = synth_data / "images" / "train"
    transform = PretrainTransform(32, AugmentConfig(scale=(0.8, 1.0), hflip=0.0, randaugment=None))
    dataset = VQATrainDataset.from_files([train], [(root, root)], transform)
    tokenizer = load_tokenizer(synth_data / "tokenizer")
    batch = VQATrainCollate(tokenizer, 25, spell_numbers=True)([dataset[i] for i in range(len(dataset))])
    assert batch["skipped"] == {"missing_file": 1, "missing_image": 1, "missing_question": 1, "missing_answer": 1}
    assert batch["image"].shape == (2, 3, 32, 32) and batch["input_ids"].shape[0] == 2
    assert batch["answer_question"].tolist() == [0, 0, 0, 1]  # three distinct answers, then the VG answer
    assert batch["answer_weight"].tolist() == pytest.approx([0.6, 0.3, 0.1, 0.5])
    ids = batch["answer_ids"]
    assert (ids[:, 0] == tokenizer.cls_token_id).all()
    assert all(
        int(row[mask.bool()][-1]) == tokenizer.sep_token_id for row, mask in zip(ids, batch["answer_mask"], strict=True)
    )
    assert tokenizer.unk_token_id not in ids[3].tolist()  # "2" spelled "two" for a tokenizer without digits


def test_a_flipped_image_swaps_left_and_right_in_the_question_and_answers(synth_data: Path, tmp_path: Path) -> None:
    from vlalign.data.transforms import AugmentConfig, PretrainTransform

    image = sorted((synth_data / "images" / "train").glob("*.jpg"))[0].name
    train = tmp_path / "train.json"
    train.write_text(json.dumps([_entry(1, image, "is the circle left of the star?", ["left", "on the left"])]))
    root = synth_data / "images" / "train"
    transform = PretrainTransform(32, AugmentConfig(scale=(0.8, 1.0), hflip=1.0, randaugment=None))
    sample = VQATrainDataset.from_files([train], [(root, root)], transform)[0]
    assert sample.question == "is the circle right of the star"
    assert sample.answers == ["right", "on the right"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda rows: rows[1].pop("question_id"), r"entry 1 has no question_id"),
        (lambda rows: rows[1].update(question_id=rows[0]["question_id"]), r"entry 1 repeats question_id"),
        (lambda rows: rows[1].update(image=""), r"entry 1 \(question_id \d+\) has no image path"),
        (lambda rows: rows[1].update(question=None), r"entry 1 \(question_id \d+\) has no question"),
        (lambda rows: rows[1].update(answer=[]), r"entry 1 \(question_id \d+\) has an unusable answer"),
        (lambda rows: rows[1].pop("answer"), r"entry 1 has no 'answer' but entry 0 has"),
        (lambda rows: rows[1].update(image="images/test/missing.jpg"), r"entry 1: .*missing\.jpg"),
        (lambda rows: rows.__setitem__(1, "a string"), r"entry 1 is a JSON string"),
    ],
)
def test_eval_file_errors_name_the_file_and_the_entry(synth_data: Path, tmp_path: Path, change, expected: str) -> None:
    from vlalign.data.transforms import EvalTransform

    rows = json.loads((synth_data / "vqa_test.json").read_text())[:3]
    change(rows)
    bad = tmp_path / "bad_test.json"
    bad.write_text(json.dumps(rows))
    with pytest.raises(InputFileError, match=expected) as info:
        VQAEvalDataset(bad, synth_data, synth_data, EvalTransform(32))
    assert str(bad) in str(info.value)


def test_answer_list_errors_name_the_entry_and_duplicates_are_dropped(tmp_path: Path) -> None:
    good = tmp_path / "answer_list.json"
    good.write_text(json.dumps(["yes", "no", "yes", "2"]))
    assert load_answer_list(good) == ["yes", "no", "2"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(["yes", 3]))
    with pytest.raises(InputFileError, match=r"bad\.json: entry 1 is a JSON number"):
        load_answer_list(bad)


def test_question_cleaning_and_number_spelling() -> None:
    assert pre_question("What's the colour of the red-circle?  ") == "whats the colour of the red circle"
    assert pre_question("a b c d", max_words=2) == "a b"
    assert spell_out_numbers("2 of 10 and 12") == "two of ten and 12"


# -- synthetic files -----------------------------------------------------------------------------------------------
def test_synthetic_vqa_files_are_in_the_public_layout(synth_data: Path) -> None:
    from vlalign.data.synth_vqa import QUESTIONS_PER_IMAGE, scene_questions

    answer_list = json.loads((synth_data / "answer_list.json").read_text())
    ids: set[int] = set()
    for split, images in (("train", 80), ("val", 16), ("test", 16)):
        entries = json.loads((synth_data / f"vqa_{split}.json").read_text())
        assert len(entries) == images * QUESTIONS_PER_IMAGE
        for entry in entries:
            assert {"question_id", "question", "answer", "image", "dataset"} <= set(entry)
            assert entry["dataset"] == "vqa" and len(entry["answer"]) == 10
            assert set(entry["answer"]) <= set(answer_list) and (synth_data / entry["image"]).is_file()
            ids.add(entry["question_id"])
        kinds = {entry["answer_type"] for entry in entries}
        assert kinds == {"yes/no", "number", "other"}
        assert any(len(set(entry["answer"])) > 1 for entry in entries), "annotators disagree on some questions"
    assert len(ids) == (80 + 16 + 16) * QUESTIONS_PER_IMAGE  # unique across splits
    # every question and every spelled answer is in the caption tokenizer's alphabet; answers stay distinct
    tokenizer = load_tokenizer(synth_data / "tokenizer")
    questions = {pre_question(e["question"]) for e in json.loads((synth_data / "vqa_train.json").read_text())}
    assert all(tokenizer.unk_token_id not in tokenizer(q)["input_ids"] for q in questions)
    answer_ids, _ = tokenize_answers(tokenizer, [spell_out_numbers(a) for a in answer_list])
    assert tokenizer.unk_token_id not in answer_ids.tolist() and len({tuple(r) for r in answer_ids.tolist()}) == len(
        answer_list
    )
    # its own random stream: the same record gives the same questions, another seed others
    from vlalign.data.synth import Scene, SceneRecord, Shape

    record = SceneRecord("000000007", "train", "images/train/000000007.jpg",
                         Scene("white", (Shape("red", "circle", "small", "left", 0.2, 0.5),
                                         Shape("blue", "star", "large", "right", 0.8, 0.5))), ("caption",))  # fmt: skip
    assert scene_questions(record, 0) == scene_questions(record, 0)
    assert [scene_questions(record, s) for s in range(5)] != [scene_questions(record, 0)] * 5


# -- the task end to end -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrained(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SIMLA pretraining checkpoint (XMM's MLM head included), 32 px, the synthetic tokenizer, no training."""
    from vlalign.testing import tiny_recipe

    tokenizer = load_tokenizer(synth_data / "tokenizer")
    recipe = tiny_recipe("simla", vocab=vocab_info(tokenizer)).eval()
    spec = recipe.model_spec()
    spec["preprocessing"] = Preprocessing(image_size=32, tokenizer_files=tokenizer_files(tokenizer)).to_dict()
    ckpt = tmp_path_factory.mktemp("vqa_pretrained") / "pretrain.ckpt"
    torch.save({"state_dict": recipe.state_dict(), "vlalign_model": spec, "global_step": 0, "epoch": 0}, ckpt)
    return ckpt


@pytest.fixture(scope="module")
def public_layout(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The synthetic VQA split in the public layout, as another tool writes it: images under their own root, paths
    relative to it, and a test file without answers (as VQA v2's)."""
    root = tmp_path_factory.mktemp("vqa_public")
    images = root / "coco"
    shutil.copytree(synth_data / "images", images)
    files = {"root": images, "answer_list": root / "answer_list.json"}
    for split in ("train", "val", "test"):
        rows = json.loads((synth_data / f"vqa_{split}.json").read_text())
        for row in rows:
            row["image"] = row["image"].removeprefix("images/")
            if split == "test":
                del row["answer"], row["answer_type"], row["question_type"]
        files[split] = root / f"vqa_{split}.json"
        files[split].write_text(json.dumps(rows))
    shutil.copy(synth_data / "answer_list.json", files["answer_list"])
    return files


def _data_args(files: dict[str, Path]) -> list[str]:
    return [
        "--data.train_files", f"[{files['train']}]",
        "--data.val_file", str(files["val"]),
        "--data.test_file", str(files["test"]),
        "--data.answer_list", str(files["answer_list"]),
        "--data.image_root", str(files["root"]),
        "--data.batch_size", "8",
        "--data.eval_batch_size", "16",
        "--data.num_workers", "0",
    ]  # fmt: skip


def _run_args(root: Path) -> list[str]:
    return [
        "--trainer.default_root_dir", str(root),
        "--trainer.logger.init_args.save_dir", str(root / "runs"),
        "--trainer.enable_progress_bar", "false",
        "--model.k_test", "6",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finetuned(pretrained: Path, public_layout: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`vlalign finetune vqa` for 4 steps with a validation every 2: best checkpoint by val/acc, then test."""
    root = tmp_path_factory.mktemp("vqa_finetune")
    args = ["finetune", "vqa", "--config", str(TINY), "--model.init_from", str(pretrained)]
    args += _data_args(public_layout) + _run_args(root)
    args += ["--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1"]
    args += ["--model.alpha_warmup_steps", "2"]
    assert main(args) == 0
    (results_file,) = sorted(root.rglob("results.json"))
    return {"root": root, "results_file": results_file, "results": json.loads(results_file.read_text())}


def test_task_initialises_the_decoder_from_the_checkpoint_stream_and_mlm_head(pretrained: Path) -> None:
    from vlalign.tasks.vqa import VQATask

    task = VQATask(init_from=str(pretrained))
    state = torch.load(pretrained, weights_only=True)["state_dict"]
    assert task.answer_decoder.num_layers == 1 and task.decoder_source == "stream"  # half of the 2-layer stream
    own = task.answer_decoder.state_dict()
    for name in ("attention.self.query.weight", "crossattention.self.key.weight", "output.dense.weight"):
        assert torch.equal(own[f"encoder.layer.0.{name}"], state[f"backbone.stream.encoder.layer.1.{name}"])
    assert torch.equal(own["head.transform.dense.weight"], state["xmm.mlm_head.transform.dense.weight"])
    assert torch.equal(own["head.bias"], state["xmm.mlm_head.bias"])
    for online, twin in task.momentum_pairs():
        for p, p_m in zip(online.parameters(), twin.parameters(), strict=True):
            assert torch.equal(p, p_m) and not p_m.requires_grad
            assert p.requires_grad or p is task.backbone.vision.mask_token  # nothing is masked in fine-tuning
    assert task.training and not task.answer_decoder_m.training  # the teacher runs without dropout
    assert not any(p.requires_grad for p in task.itc.parameters())  # kept for vlalign.load, never trained


def test_task_range_errors_name_the_key(pretrained: Path) -> None:
    from vlalign.errors import ConfigError
    from vlalign.tasks.vqa import VQATask

    with pytest.raises(ConfigError, match="model.k_test must be >= 1"):
        VQATask(init_from=str(pretrained), k_test=0)
    with pytest.raises(ConfigError, match="model.decoder_layers=3, but the stream .* has 2 layers"):
        VQATask(init_from=str(pretrained), decoder_layers=3)


def test_finetune_writes_results_and_a_submission_without_duplicates(
    finetuned: dict, public_layout: dict[str, Path]
) -> None:
    results = finetuned["results"]
    assert results["task"] == "vqa" and results["command"] == "finetune" and results["split"] == "test"
    assert Path(results["checkpoint"]).name.startswith("best-"), "the best checkpoint by val/acc is tested"
    assert results["metrics"] == {}, "the test split has no answers: nothing to score locally"
    details = results["details"]
    assert details["num_questions"] == 48 and details["k_test"] == 6 and details["scoring"] == "sequence"
    submission = json.loads(Path(details["submission"]).read_text())
    questions = [row["question_id"] for row in json.loads(public_layout["test"].read_text())]
    assert [row["question_id"] for row in submission] == questions  # each once, in file order
    answer_list = set(json.loads(public_layout["answer_list"].read_text()))
    assert all(row["answer"] in answer_list for row in submission)
    run = finetuned["results_file"].parent
    assert (run / "checkpoints" / "last.ckpt").is_file() and list(run.glob("events.out.tfevents.*"))


def test_evaluate_scores_a_split_with_answers_and_reloads_the_trained_decoder(
    finetuned: dict, public_layout: dict[str, Path], tmp_path: Path
) -> None:
    import vlalign

    checkpoint = finetuned["results"]["checkpoint"]
    assert vlalign.load(checkpoint).config["finetuned"]["task"] == "vqa"  # still a model vlalign.load reads
    out = tmp_path / "eval"
    args = ["evaluate", "vqa", "--model", checkpoint, "--config", str(TINY), "--split", "val", "--out", str(out)]
    assert main(args + _data_args(public_layout) + _run_args(tmp_path)) == 0
    results = json.loads((out / "results.json").read_text())
    metrics = results["metrics"]
    assert {"val/acc", "val/acc_yes_no", "val/acc_number", "val/acc_other", "val/majority_acc"} <= set(metrics)
    assert all(0.0 <= value <= 100.0 for value in metrics.values())
    # the submission file agrees with the reported accuracy (official rule, recomputed here)
    val = json.loads(public_layout["val"].read_text())
    predicted = {row["question_id"]: row["answer"] for row in json.loads((out / "vqa_val_submission.json").read_text())}
    expected = vqa_accuracy([predicted[row["question_id"]] for row in val], [row["answer"] for row in val])
    assert metrics["val/acc"] == pytest.approx(expected, abs=1e-3)
    # the test answers of evaluate equal those of finetune: the trained decoder was loaded, not re-initialised
    out_test = tmp_path / "eval_test"
    args = ["evaluate", "vqa", "--model", checkpoint, "--config", str(TINY), "--out", str(out_test)]
    assert main(args + _data_args(public_layout) + _run_args(tmp_path)) == 0
    again = json.loads((out_test / "vqa_test_submission.json").read_text())
    assert again == json.loads(Path(finetuned["results"]["details"]["submission"]).read_text())


def test_evaluation_file_error_reaches_the_command_line_as_one_error(
    pretrained: Path, public_layout: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = json.loads(public_layout["test"].read_text())[:3]
    rows[2]["image"] = "test/nowhere.jpg"
    bad = tmp_path / "vqa_test.json"
    bad.write_text(json.dumps(rows))
    args = ["evaluate", "vqa", "--model", str(pretrained), "--config", str(TINY)]
    args += _data_args(public_layout) + _run_args(tmp_path) + ["--data.test_file", str(bad)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(bad) in err and "entry 2" in err and "Traceback" not in err


def test_init_from_an_exported_folder_keeps_the_mlm_head_for_the_decoder(pretrained: Path, tmp_path: Path) -> None:
    from vlalign.cli.inference import export
    from vlalign.tasks.vqa import VQATask

    folder = tmp_path / "exported"
    export(str(pretrained), str(folder))
    task = VQATask(init_from=str(folder), distill=False)
    state = torch.load(pretrained, weights_only=True)["state_dict"]
    assert torch.equal(task.answer_decoder.head.transform.dense.weight, state["xmm.mlm_head.transform.dense.weight"])
    assert task.answer_decoder_m is None and task.backbone.vision_m is None


def test_init_from_a_converted_reference_file_keeps_the_mlm_head_for_the_decoder(
    pretrained: Path, synth_data: Path, tmp_path: Path
) -> None:
    """A file in the layout `vlalign convert reference` writes (backbone-relative keys, no model spec)."""
    from safetensors.torch import save_file

    from vlalign.tasks.vqa import VQATask

    state = torch.load(pretrained, weights_only=True)["state_dict"]
    kept = ("backbone.vision.", "backbone.stream.", "itc.vision_proj", "itc.text_proj", "itc.temp", "itm.", "xmm.mlm")
    converted = {k.removeprefix("backbone."): v.clone() for k, v in state.items() if k.startswith(kept)}
    file = tmp_path / "simla.safetensors"
    save_file(converted, str(file))
    task = VQATask(init_from=str(file), tokenizer=str(synth_data / "tokenizer"), distill=False)
    assert task.decoder_source == "stream"
    assert torch.equal(task.answer_decoder.head.bias, state["xmm.mlm_head.bias"])
    query = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(
        task.answer_decoder.state_dict()[query], state["backbone.stream.encoder.layer.1.attention.self.query.weight"]
    )
