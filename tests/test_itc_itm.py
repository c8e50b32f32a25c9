"""ITC and ITM losses against independent hand computations on small tensors (plain Python math)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from vlalign.data.tokenization import VocabInfo
from vlalign.objectives.base import BuildSpec
from vlalign.objectives.functional import sample_hard_negatives
from vlalign.objectives.itc import ITC
from vlalign.objectives.itm import ITM

WIDTH = 4


def _spec(momentum: bool) -> BuildSpec:
    return BuildSpec(WIDTH, WIDTH, VocabInfo(vocab_size=50), (2, 2), 8, momentum=momentum)


def _identity_projections(itc: ITC) -> None:
    with torch.no_grad():
        for name in ("vision_proj", "text_proj", "vision_proj_m", "text_proj_m"):
            layer = getattr(itc, name, None)
            if layer is not None:
                layer.weight.copy_(torch.eye(WIDTH))
                layer.bias.zero_()


def _unit(vec: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vec))
    return [x / norm for x in vec]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _softmax(xs: list[float]) -> list[float]:
    top = max(xs)
    exps = [math.exp(x - top) for x in xs]
    total = sum(exps)
    return [e / total for e in exps]


def _hand_direction(queries, teacher_queries, candidates, temp, alpha) -> float:
    loss = 0.0
    for i, (q, qm) in enumerate(zip(queries, teacher_queries, strict=True)):
        probs = _softmax([_dot(q, c) / temp for c in candidates])
        teacher = _softmax([_dot(qm, c) / temp for c in candidates])
        for j in range(len(candidates)):
            target = alpha * teacher[j] + (1 - alpha) * (1.0 if j == i else 0.0)
            loss -= target * math.log(probs[j])
    return loss / len(queries)


def _ctx(batch: int, alpha: float, seed: int = 0) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        image_tokens=torch.randn(batch, 3, WIDTH, generator=g),
        text_states=torch.randn(batch, 5, WIDTH, generator=g),
        image_tokens_m=torch.randn(batch, 3, WIDTH, generator=g),
        text_states_m=torch.randn(batch, 5, WIDTH, generator=g),
        attention_mask=torch.ones(batch, 5, dtype=torch.long),
        alpha=alpha,
        published={},
    )


def _cls(tokens: torch.Tensor) -> list[list[float]]:
    return [_unit(row) for row in tokens[:, 0].tolist()]


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_itc_with_queue_and_distillation_matches_hand_computation(alpha: float) -> None:
    itc = ITC(embed_dim=WIDTH, temperature=0.1, queue_size=5, distill=True)
    itc.build(_spec(momentum=True))
    _identity_projections(itc)
    ctx = _ctx(batch=3, alpha=alpha)
    out = itc(ctx)

    v, t = _cls(ctx.image_tokens), _cls(ctx.text_states)
    vm, tm = _cls(ctx.image_tokens_m), _cls(ctx.text_states_m)
    queue_v = [_unit(col) for col in itc.image_queue.t().tolist()]  # already unit columns
    queue_t = [_unit(col) for col in itc.text_queue.t().tolist()]
    i2t = _hand_direction(v, vm, tm + queue_t, 0.1, alpha)
    t2i = _hand_direction(t, tm, vm + queue_v, 0.1, alpha)
    assert out.loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-5)


def test_itc_without_momentum_is_clip_loss() -> None:
    itc = ITC(embed_dim=WIDTH, temperature=0.05, queue_size=0, distill=False)
    itc.build(_spec(momentum=False))
    assert not hasattr(itc, "vision_proj_m") and itc.momentum_encoders() == frozenset()
    _identity_projections(itc)
    ctx = _ctx(batch=4, alpha=0.4)
    out = itc(ctx)
    v, t = _cls(ctx.image_tokens), _cls(ctx.text_states)
    expected = (_hand_direction(v, v, t, 0.05, 0.0) + _hand_direction(t, t, v, 0.05, 0.0)) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    out.loss.backward()
    assert itc.temp.grad is not None and itc.vision_proj.weight.grad is not None


def test_itc_queue_wraps_around_when_size_does_not_divide_batch() -> None:
    itc = ITC(embed_dim=WIDTH, queue_size=5)
    itc.build(_spec(momentum=True))
    _identity_projections(itc)
    written = []
    for step in range(3):  # 3 × 3 = 9 features into a ring of 5
        ctx = _ctx(batch=3, alpha=0.0, seed=step)
        itc(ctx)
        written.append(torch.tensor(_cls(ctx.image_tokens_m)))
        itc.after_optimizer_step()
    all_written = torch.cat(written)  # write order 0..8 → slots 0,1,2,3,4,0,1,2,3
    assert itc.queue_ptr.item() == 9 % 5
    expected_slots = {slot: all_written[i] for i, slot in enumerate(i % 5 for i in range(9))}
    for slot, feature in expected_slots.items():
        torch.testing.assert_close(itc.image_queue[:, slot], feature, atol=1e-6, rtol=0)


def test_itc_publishes_local_similarities_and_clamps_temperature() -> None:
    itc = ITC(embed_dim=WIDTH, queue_size=7, temperature=0.07)
    itc.build(_spec(momentum=True))
    with torch.no_grad():
        itc.temp.fill_(5.0)
    out = itc(_ctx(batch=3, alpha=0.4))
    assert itc.temp.item() == pytest.approx(0.5)
    assert out.publish["sim_i2t"].shape == (3, 3) and out.publish["sim_t2i"].shape == (3, 3)


def test_itc_rejects_out_of_range_temperature() -> None:
    with pytest.raises(ValueError, match="itc.temperature"):
        ITC(temperature=0.9)


def test_hard_negatives_never_equal_the_positive() -> None:
    g = torch.Generator().manual_seed(0)
    for batch in (2, 3, 17):
        sim = torch.randn(batch, batch, generator=g) * 50  # peaked rows: underflow elsewhere
        sim.diagonal().fill_(1e4)  # the positive dominates the softmax before masking
        for _ in range(20):
            drawn = sample_hard_negatives(sim, generator=g)
            assert (drawn != torch.arange(batch)).all()


def test_hard_negatives_follow_softmax_of_similarities() -> None:
    sim = torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([sample_hard_negatives(sim, generator=g) for _ in range(4000)])
    # row 0: columns 1, 2 with weights e^3 : e^0
    p_col1 = math.exp(3) / (math.exp(3) + 1)
    assert (draws[:, 0] == 1).float().mean().item() == pytest.approx(p_col1, abs=0.03)
    assert (draws[:, 1] == 0).float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert (draws[:, 2] == 0).float().mean().item() == pytest.approx(0.5, abs=0.03)


def test_hard_negatives_respect_identity_exclusion() -> None:
    ids = torch.tensor([0, 0, 1, 2])
    same = ids[:, None] == ids[None, :]
    g = torch.Generator().manual_seed(2)
    for _ in range(50):
        drawn = sample_hard_negatives(torch.zeros(4, 4), same, generator=g)
        assert (ids[drawn] != ids).all()


class _RecordingFusion:
    """Stands in for the stream: returns random fused states and records what it was given."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.calls: list[dict] = []

    def __call__(self, input_ids, attention_mask, image_tokens, **kwargs) -> SimpleNamespace:
        self.calls.append({"input_ids": input_ids, "image_tokens": image_tokens, **kwargs})
        n, length = input_ids.shape
        self.last_output = torch.randn(n, length, self.width)
        return SimpleNamespace(last_hidden_state=self.last_output)


def test_itm_loss_and_batched_negative_pass_match_hand_computation() -> None:
    batch, width = 4, WIDTH
    itm = ITM()
    itm.build(_spec(momentum=False))
    fusion = _RecordingFusion(width)
    image_tokens = torch.randn(batch, 3, width)
    input_ids = torch.arange(batch * 5).view(batch, 5)
    ctx = SimpleNamespace(
        published={"itc": {"sim_i2t": torch.randn(batch, batch), "sim_t2i": torch.randn(batch, batch)}},
        same_image=None,
        image_tokens=image_tokens,
        input_ids=input_ids,
        attention_mask=torch.ones(batch, 5, dtype=torch.long),
        single_stream=True,
        fuse=fusion,
        word_embeds=torch.randn(batch, 5, width),
    )
    out = itm(ctx)
    assert len(fusion.calls) == 1, "positives and negatives must be one fusion pass"
    call = fusion.calls[0]
    images, ids = call["image_tokens"], call["input_ids"]
    assert images.shape[0] == ids.shape[0] == 3 * batch
    torch.testing.assert_close(images[:batch], image_tokens)
    torch.testing.assert_close(images[2 * batch :], image_tokens)
    torch.testing.assert_close(ids[: 2 * batch], input_ids.repeat(2, 1))
    for i in range(batch):  # negatives are other samples
        assert not torch.equal(images[batch + i], image_tokens[i])
        assert not torch.equal(ids[2 * batch + i], input_ids[i])
    # the pass reads the step's shared word-embedding rows of exactly the captions it fuses (no second lookup)
    caption = (ids[:, :1] == input_ids[:, 0][None, :]).int().argmax(1)
    torch.testing.assert_close(call["word_embeds"], ctx.word_embeds[caption], rtol=0, atol=0)

    # hand cross-entropy over the recorded fused [CLS] states: positives first (label 1), then 2B negatives
    w, b = itm.itm_head.weight.tolist(), itm.itm_head.bias.tolist()
    expected = 0.0
    for row, state in enumerate(fusion.last_output[:, 0].tolist()):
        logits = [_dot(w[k], state) + b[k] for k in range(2)]
        expected -= math.log(_softmax(logits)[1 if row < batch else 0])
    assert out.loss.item() == pytest.approx(expected / (3 * batch), rel=1e-5)


def _itm_ctx(batch: int, sim: torch.Tensor) -> SimpleNamespace:
    return SimpleNamespace(
        published={"itc": {"sim_i2t": sim, "sim_t2i": sim}},
        same_image=None,
        image_tokens=torch.randn(batch, 3, WIDTH),
        input_ids=torch.arange(batch * 5).view(batch, 5),
        attention_mask=torch.ones(batch, 5, dtype=torch.long),
        single_stream=True,
        fuse=_RecordingFusion(WIDTH),
        word_embeds=torch.randn(batch, 5, WIDTH),
    )


def test_itm_hard_negative_curriculum_ramps_from_uniform_to_itc_softmax() -> None:
    """beta = steps / warm-up, clamped at 1; negatives drawn from softmax(beta * sim): uniform at step 0."""
    batch, draws = 4, 2400
    itm = ITM(hard_negatives_warmup_steps=4)
    itm.build(_spec(momentum=False))
    sim = torch.tensor([[0.0, 8.0, 0.0, 0.0]] * batch)  # column 1 is by far the hardest negative of every row
    sim[1] = torch.tensor([8.0, 0.0, 0.0, 0.0])

    def share_of_hardest() -> tuple[float, torch.Tensor]:
        torch.manual_seed(0)
        hits = 0
        for _ in range(draws // batch):
            out = itm(_itm_ctx(batch, sim))
            hits += int((out.publish["negative_image"][[0, 2, 3]] == 1).sum())
        return hits / (draws // batch * 3), out.logs["hardness"]

    share, beta = share_of_hardest()
    assert float(beta) == 0.0
    assert share == pytest.approx(1 / 3, abs=0.045), "step 0: uniform over the three other images"
    for _ in range(2):
        itm.after_optimizer_step()
    share, beta = share_of_hardest()
    expected = math.exp(4.0) / (math.exp(4.0) + 2)  # softmax(0.5 * sim) over the three allowed columns
    assert float(beta) == 0.5 and share == pytest.approx(expected, abs=0.045)
    for _ in range(10):
        itm.after_optimizer_step()
    assert float(itm.hardness()) == 1.0, "the ramp ends at the reference's softmax(sim)"

    restored = ITM(hard_negatives_warmup_steps=4)  # the step count is a buffer: a resumed run continues the ramp
    restored.build(_spec(momentum=False))
    restored.load_state_dict(itm.state_dict())
    assert int(restored.negatives_step) == 12 and float(restored.hardness()) == 1.0


def test_itm_curriculum_waits_until_running_accuracy_reaches_the_start_accuracy() -> None:
    """With hard_negatives_start_accuracy the ramp advances only while the running accuracy (exponential average,
    weight 0.05 per step) is at or above it; the average is updated from each real step's accuracy."""
    itm = ITM(hard_negatives_warmup_steps=10, hard_negatives_start_accuracy=0.8)
    itm.build(_spec(momentum=False))
    running = 0.0
    for _ in range(30):  # the all-"no match" prior: 2/3 correct
        itm._last_accuracy = torch.tensor(2 / 3)
        itm.after_optimizer_step()
        running += 0.05 * (2 / 3 - running)
    assert float(itm.running_accuracy) == pytest.approx(running, abs=1e-6)
    assert int(itm.negatives_step) == 0 and float(itm.hardness()) == 0.0
    steps_below = 0
    while running < 0.8:  # now every step is right: the average climbs and crosses 0.8
        itm._last_accuracy = torch.tensor(1.0)
        itm.after_optimizer_step()
        running += 0.05 * (1.0 - running)
        steps_below += running < 0.8
    assert int(itm.negatives_step) == 1, "the ramp starts on the step the average reaches the start accuracy"
    for _ in range(20):
        itm._last_accuracy = torch.tensor(1.0)
        itm.after_optimizer_step()
    assert float(itm.hardness()) == 1.0 and steps_below > 0
    with pytest.raises(ValueError, match="needs model.itm.hard_negatives_warmup_steps"):
        ITM(hard_negatives_start_accuracy=0.8)


def test_itm_without_curriculum_has_no_step_buffer_and_rejects_negative_warmup() -> None:
    itm = ITM()
    itm.build(_spec(momentum=False))
    assert itm.hardness() is None and "negatives_step" not in itm.state_dict()
    with pytest.raises(ValueError, match="model.itm.hard_negatives_warmup_steps"):
        ITM(hard_negatives_warmup_steps=-1)


def test_recipe_slot_requirements_fail_before_training() -> None:
    from vlalign.tasks.pretrain import PretrainRecipe

    with pytest.raises(ValueError, match="model.itm requires model.itc"):
        PretrainRecipe(itc=None, itm=ITM(), vision=_tiny_vision(), stream=_tiny_stream())


def _tiny_vision():
    from vlalign.models.vision import VisionConfig

    return VisionConfig(name="vit_vlalign_tiny_patch8", img_size=32)


def _tiny_stream():
    from vlalign.models.stream import StreamConfig

    return StreamConfig(
        vocab_size=50, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=64, encoder_width=64
    )


def test_itc_mean_pooling_averages_only_real_tokens() -> None:
    itc = ITC(embed_dim=WIDTH, queue_size=0, distill=False, text_pooling="mean")
    itc.build(_spec(momentum=False))
    _identity_projections(itc)
    states = torch.randn(2, 4, WIDTH)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    feats = itc.text_features(states, mask)
    expected = [
        _unit([sum(states[b, t, d].item() for t in range(n)) / n for d in range(WIDTH)]) for b, n in ((0, 2), (1, 4))
    ]
    torch.testing.assert_close(feats, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="itc.text_pooling"):
        ITC(text_pooling="max")


# -- retrieval fine-tuning: every caption of the same image is a positive ---------------------------------------------
def _hand_direction_with_targets(queries, teacher_queries, candidates, targets, temp, alpha) -> float:
    loss = 0.0
    for q, qm, row in zip(queries, teacher_queries, targets, strict=True):
        probs = _softmax([_dot(q, c) / temp for c in candidates])
        teacher = _softmax([_dot(qm, c) / temp for c in candidates])
        for j in range(len(candidates)):
            loss -= (alpha * teacher[j] + (1 - alpha) * row[j]) * math.log(probs[j])
    return loss / len(queries)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_itc_same_image_positives_span_batch_and_queue_like_hand_computation(alpha: float) -> None:
    """Hand-made batch: captions 0 and 2 show image 11, which the queue also holds (slot 1) from the step before."""
    itc = ITC(embed_dim=WIDTH, temperature=0.1, queue_size=6, distill=True, same_image_positives=True)
    itc.build(_spec(momentum=True))
    _identity_projections(itc)
    first = _ctx(batch=4, alpha=alpha, seed=1)
    first.batch = {"image_ids": torch.tensor([10, 11, 12, 13])}
    itc(first)
    itc.after_optimizer_step()
    assert itc.image_id_queue.tolist() == [10, 11, 12, 13, -1, -1]  # -1: slots holding no sample yet

    ctx = _ctx(batch=4, alpha=alpha, seed=2)
    ctx.batch = {"image_ids": torch.tensor([11, 20, 11, 21])}
    queue_v = [_unit(col) for col in itc.image_queue.t().tolist()]
    queue_t = [_unit(col) for col in itc.text_queue.t().tolist()]
    out = itc(ctx)
    # candidates: the 4 batch samples (ids 11 20 11 21), then the 6 queue slots (ids 10 11 12 13 -1 -1)
    third = 1.0 / 3.0
    targets = [
        [third, 0, third, 0, 0, third, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [third, 0, third, 0, 0, third, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
    ]
    v, t = _cls(ctx.image_tokens), _cls(ctx.text_states)
    vm, tm = _cls(ctx.image_tokens_m), _cls(ctx.text_states_m)
    i2t = _hand_direction_with_targets(v, vm, tm + queue_t, targets, 0.1, alpha)
    t2i = _hand_direction_with_targets(t, tm, vm + queue_v, targets, 0.1, alpha)
    assert out.loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-5)

    itc.after_optimizer_step()  # the ring wraps: slots 4, 5, 0, 1 take this step's ids
    assert itc.image_id_queue.tolist() == [11, 21, 12, 13, 11, 20]


def test_itc_without_same_image_positives_keeps_pretraining_state_and_targets() -> None:
    itc = ITC(embed_dim=WIDTH, queue_size=4)
    itc.build(_spec(momentum=True))
    assert "image_id_queue" not in itc.state_dict()  # pretraining checkpoints are unchanged
    ctx = _ctx(batch=3, alpha=0.0)
    ctx.batch = {"image_ids": torch.tensor([1, 1, 2])}  # ignored: pretraining treats each pair alone
    reference = ITC(embed_dim=WIDTH, queue_size=4)
    reference.build(_spec(momentum=True))
    reference.load_state_dict(itc.state_dict())
    assert itc(ctx).loss.item() == pytest.approx(reference(_ctx(batch=3, alpha=0.0)).loss.item(), rel=1e-6)


def test_itc_same_image_positives_needs_image_ids() -> None:
    itc = ITC(embed_dim=WIDTH, queue_size=4, same_image_positives=True)
    itc.build(_spec(momentum=True))
    ctx = _ctx(batch=3, alpha=0.0)
    ctx.batch = {}
    with pytest.raises(KeyError, match="image_ids"):
        itc(ctx)
