"""Probes of a pretrained model's fusion: does the image reach the fused [CLS], and does it tell matches apart?

Used for the ITM study in docs/toy_ablation.md. On the retrieval split of `vlalign data synth` data (first caption
per image) it reports, for the model and optionally for a freshly initialised copy of the same spec:

- ``crossattn_update``: per stream layer, ``|dense(cross-attention output)| / |residual|``, the share of the text
  state the image contributes before the post-LayerNorm (0.045 at initialisation at the tiny size);
- ``cls_image_sensitivity``: how far the fused [CLS] moves when the image is swapped for another one, relative to
  when the caption is swapped;
- ``probe_cls`` / ``probe_mean``: accuracy of a logistic-regression probe telling (image, its caption) from
  (another image, that caption) on the fused [CLS] / mean-pooled fused states, fitted on half the captions and
  scored on the other half (chance 0.5): is the match information in the states at all?
- ``vision_probe_colour`` / ``vision_probe_shape``: can a linear read-out of the ViT's mean-pooled tokens name the
  colour / the shape of the single-shape test images (chance: the most frequent class)?
- ``itm_pos_vs_random``: how often the ITM head scores the true pair above the swapped-image pair, and its mean
  match probabilities.

    python -m benchmarks.itm_probes --model RUN/checkpoints/last.ckpt --data demo_run/data [--init]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import vlalign
from vlalign.tasks.pretrain import PretrainRecipe


def logistic_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor) -> float:
    """Accuracy on the test rows of an L2-regularised logistic regression fitted (L-BFGS) on standardised train rows."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    weight = torch.zeros(x_train.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=300)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x_train @ weight + bias, y_train) + 1e-3 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float(((x_test @ weight + bias > 0).float() == y_test).float().mean())


def softmax_probe(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, test: torch.Tensor) -> float:
    """Test accuracy of an L2-regularised multinomial logistic regression (L-BFGS) fitted on the ``train`` rows."""
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    x = (x - mean) / std
    classes = int(y.max()) + 1
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=300)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x[train] @ weight + bias, y[train]) + 1e-3 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float(((x[test] @ weight + bias).argmax(-1) == y[test]).float().mean())


@torch.no_grad()
def vision_probe(model: vlalign.VisionLanguageModel, data: Path) -> dict:
    """Can a linear read-out of the ViT's mean-pooled tokens name the colour / the shape of single-shape images?

    Colour and shape come from the hard-negative files' positive caption (``"a red circle on the left"``: a single
    shape); half the images fit the probe, the other half score it. Chance: the most frequent class of the scored
    half."""
    colours, shapes = [], []
    images = []
    for split in ("val", "test"):
        for entry in json.loads((data / f"hardneg_{split}.json").read_text()):
            words = entry["positive"].split()
            if " of " in entry["positive"] or "above" in words or "below" in words:
                continue  # a relation between two shapes
            colours.append(words[1])
            shapes.append(words[2])
            images.append(data / entry["image"])
    pixels = torch.stack([model.preprocess_image(image) for image in images])
    features = model.backbone.vision(pixels).mean(1)
    n = len(images)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))  # the same split for every model
    train, test = order[: n // 2], order[n // 2 :]
    result: dict = {"single_shape_images": n}
    for what, names in (("colour", colours), ("shape", shapes)):
        vocabulary = sorted(set(names))
        y = torch.tensor([vocabulary.index(name) for name in names])
        with torch.enable_grad():
            result[f"vision_probe_{what}"] = round(softmax_probe(features, y, train, test), 3)
        result[f"vision_probe_{what}_chance"] = round(float(torch.bincount(y[test]).max()) / len(test), 3)
    return result


@torch.no_grad()
def probe(model: vlalign.VisionLanguageModel, data: Path, label: str) -> dict:
    entries = json.loads((data / "retrieval_val.json").read_text())
    n = len(entries)
    pixels = torch.stack([model.preprocess_image(data / entry["image"]) for entry in entries])
    ids, mask = model.tokenize([entry["caption"][0] for entry in entries])
    ratios: dict[str, list[float]] = {}
    hooks = []
    for name, module in model.backbone.named_modules():
        if name.endswith("crossattention.output"):
            layer = name.split(".")[-3]

            def hook(module, inputs, output, layer=layer):  # noqa: ANN001
                update, residual = inputs
                ratios.setdefault(layer, []).append(float(module.dense(update).norm() / residual.norm()))

            hooks.append(module.register_forward_hook(hook))
    tokens = model.backbone.vision(pixels)
    rows = torch.arange(n)
    other = torch.roll(rows, 1)

    def fused(image_rows: torch.Tensor, text_rows: torch.Tensor) -> torch.Tensor:
        states = None
        if not model.backbone.single_stream:
            states = model.backbone.encode_text(ids[text_rows], mask[text_rows])
        out = model.backbone.fuse(ids[text_rows], mask[text_rows], tokens[image_rows], text_states=states)
        return out.last_hidden_state

    positive, swapped_image = fused(rows, rows), fused(other, rows)
    for handle in hooks:
        handle.remove()
    swapped_text = fused(rows, other)
    weights = mask.float()[..., None]
    result: dict = {"label": label}
    cls_pos, cls_neg = positive[:, 0], swapped_image[:, 0]
    moved_by_image = (cls_pos - cls_neg).norm(dim=-1).mean()
    moved_by_text = (cls_pos - swapped_text[:, 0]).norm(dim=-1).mean()
    result["cls_image_sensitivity"] = round(float(moved_by_image / moved_by_text), 3)
    caption = torch.cat([rows, rows])
    train, test = (caption < n // 2).nonzero().flatten(), (caption >= n // 2).nonzero().flatten()
    labels = torch.cat([torch.ones(n), torch.zeros(n)])
    pooled = {
        "cls": (cls_pos, cls_neg),
        "mean": ((positive * weights).sum(1) / weights.sum(1), (swapped_image * weights).sum(1) / weights.sum(1)),
    }
    for what, (pos, neg) in pooled.items():
        x = torch.cat([pos, neg])
        with torch.enable_grad():
            result[f"probe_{what}"] = round(logistic_probe(x[train], labels[train], x[test], labels[test]), 3)
    if model.itm is not None:
        logit_pos, logit_neg = model.itm.itm_head(cls_pos), model.itm.itm_head(cls_neg)
        margin_pos, margin_neg = logit_pos[:, 1] - logit_pos[:, 0], logit_neg[:, 1] - logit_neg[:, 0]
        result["itm_pos_vs_random"] = round(float((margin_pos > margin_neg).float().mean()), 3)
        result["itm_match_prob_pos"] = round(float(logit_pos.softmax(-1)[:, 1].mean()), 3)
        result["itm_match_prob_random"] = round(float(logit_neg.softmax(-1)[:, 1].mean()), 3)
    result["crossattn_update"] = {layer: round(sum(v) / len(v), 3) for layer, v in ratios.items()}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint or exported folder")
    parser.add_argument("--data", type=Path, required=True, help="`vlalign data synth` folder")
    parser.add_argument("--init", action="store_true", help="also probe a freshly initialised model of the same spec")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    model = vlalign.load(args.model).eval()
    print(json.dumps({**probe(model, args.data, "trained"), **vision_probe(model, args.data)}))
    if args.init:
        torch.manual_seed(args.seed)
        fresh = PretrainRecipe.from_spec(model.config)
        model.backbone.load_state_dict(fresh.backbone.state_dict(), strict=False)  # online weights; no twins here
        if model.itm is not None and fresh.itm is not None:
            model.itm.load_state_dict(fresh.itm.state_dict(), strict=False)
        print(json.dumps({**probe(model, args.data, "initialisation"), **vision_probe(model, args.data)}))


if __name__ == "__main__":
    main()
