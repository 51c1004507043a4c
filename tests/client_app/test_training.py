"""Local training pieces: proximal gradient, LR schedule, confusion matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from client_app.data import logit_offsets
from client_app.training import (
    add_proximal_gradient,
    confusion_matrix,
    freeze_layers,
    frozen_layer_prefixes,
    lr_for_round,
    make_optimizer,
    optimizer_snapshot,
    proximal_value,
    restore_optimizer,
    train_local,
)


def test_proximal_gradient_equals_autograd_of_squared_norm():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    anchor = [p.detach() + 0.1 * torch.randn_like(p) for p in model.parameters()]
    mu = 0.37
    x = torch.randn(4, 5)

    model.zero_grad()
    model(x).pow(2).sum().backward()
    add_proximal_gradient(list(model.parameters()), anchor, mu)
    ours = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
    (model(x).pow(2).sum() + mu / 2 * prox).backward()
    for got, expected in zip(ours, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(got, expected)
    expected = mu / 2 * float(prox.detach())
    assert proximal_value(model.parameters(), anchor, mu) == pytest.approx(expected)


def _toy_loader(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]


def _toy_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.ReLU(), nn.Linear(16, 2))


def test_proximal_term_keeps_weights_closer_to_the_global_model():
    drift = {}
    for mu in (0.0, 5.0):
        model = _toy_model()
        anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
        stats = train_local(model, _toy_loader(), epochs=5, lr=0.01, device=torch.device("cpu"),
                            proximal_mu=mu, anchor=anchor)
        drift[mu] = sum(float((p.detach() - anchor[k]).norm() ** 2)
                        for k, p in model.named_parameters())
        assert stats.examples == 5 * 64
        assert (stats.proximal > 0) == (mu > 0)
    assert drift[5.0] < 0.8 * drift[0.0]


def test_train_local_learns_and_respects_max_batches():
    model = _toy_model()
    loader = _toy_loader(256)
    before, _ = confusion_matrix(model, loader, torch.device("cpu"), 2)
    stats = train_local(model, loader, epochs=10, lr=0.01, device=torch.device("cpu"))
    after, _ = confusion_matrix(model, loader, torch.device("cpu"), 2)
    assert np.trace(after) > np.trace(before) and np.trace(after) / after.sum() > 0.9
    capped = train_local(_toy_model(), loader, epochs=2, lr=0.01, device=torch.device("cpu"),
                         max_batches=3)
    assert capped.examples == 2 * 3 * 16
    assert stats.accuracy > 0.5


@pytest.mark.parametrize("name, lr", [("adam", 0.01), ("adamw", 0.01), ("sgd", 0.1)])
def test_each_local_optimizer_learns_the_toy_task(name, lr):
    torch.manual_seed(0)
    model = _toy_model()
    loader = _toy_loader(256)
    before, _ = confusion_matrix(model, loader, torch.device("cpu"), 2)
    train_local(model, loader, epochs=10, lr=lr, device=torch.device("cpu"),
                optimizer_name=name, weight_decay=1e-4)
    after, _ = confusion_matrix(model, loader, torch.device("cpu"), 2)
    assert np.trace(after) / after.sum() > 0.9 > np.trace(before) / before.sum()


def test_make_optimizer_builds_what_is_named_and_rejects_the_rest():
    params = [nn.Parameter(torch.zeros(2))]
    sgd = make_optimizer("sgd", params, lr=0.1, momentum=0.8, weight_decay=0.01)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["momentum"] == 0.8 and sgd.param_groups[0]["weight_decay"] == 0.01
    assert isinstance(make_optimizer("adamw", params, lr=0.1), torch.optim.AdamW)
    assert type(make_optimizer("adam", params, lr=0.1)) is torch.optim.Adam
    with pytest.raises(ValueError, match="'rmsprop'"):
        make_optimizer("rmsprop", params, lr=0.1)


def test_frozen_layers_keep_their_values_and_the_rest_trains():
    torch.manual_seed(0)
    model = _toy_model()
    names = [n for n, _ in model.named_parameters()]
    first = names[0].rsplit(".", 1)[0]  # the first layer's prefix, e.g. "0"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_local(model, _toy_loader(64), epochs=2, lr=0.05, device=torch.device("cpu"),
                frozen_layers=(first,))
    after = dict(model.named_parameters())
    for name in names:
        unchanged = torch.equal(before[name], after[name].detach())
        assert unchanged == name.startswith(first + "."), name
    with pytest.raises(ValueError, match="'head' names no parameter of the model"):
        freeze_layers(_toy_model(), ["head"])


def test_early_stands_for_the_backbones_first_layers_when_it_starts_pretrained():
    lite0 = ("backbone.conv_stem", "backbone.bn1", "backbone.blocks.0", "backbone.blocks.1",
             "backbone.blocks.2")
    assert frozen_layer_prefixes("early", "efficientnet_lite0_sa", True) == lite0
    assert frozen_layer_prefixes("early", "efficientnet_lite0_sa", "/models/lite0.pth") == lite0
    # Untrained, its filters are random: "early" then fixes nothing.
    assert frozen_layer_prefixes("early", "efficientnet_lite0_sa", False) == ()
    assert frozen_layer_prefixes(" classifier , early,classifier", "resnet10t_sa", True) == (
        "classifier", "backbone.conv1", "backbone.bn1", "backbone.layer1")
    assert frozen_layer_prefixes("", "resnet10t_sa", True) == ()
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        frozen_layer_prefixes("early", "vgg16", True)


@pytest.mark.parametrize("backbone", ["efficientnet_lite0_sa", "resnet10t_sa", "res2net50_sa"])
def test_early_layers_name_the_first_layers_of_each_backbone(backbone):
    """Every registered backbone's early layers exist in the model build_model makes (else
    freeze_layers refuses them), and they come before every other trainable layer."""
    from fedlsc_flwr.model import build_model, early_layers

    model = build_model(backbone, 7)
    frozen = set(freeze_layers(model, early_layers(backbone)))
    names = [n for n, _ in model.named_parameters()]
    assert frozen and names[:len(frozen)] == [n for n in names if n in frozen]
    assert not any(n.startswith(("attention.", "classifier.")) for n in frozen)


def test_kept_optimizer_state_continues_adam_with_this_rounds_lr():
    """Two calls sharing a state dict train as one Adam run over both: the second call
    continues the step count and moments (same weights as 8 steps in one call), at its own lr."""
    cpu = torch.device("cpu")
    loader = _toy_loader(64)  # 4 batches a pass
    one_run = _toy_model()
    train_local(one_run, loader, epochs=2, lr=0.01, device=cpu)
    kept: dict = {}
    two_rounds = _toy_model()
    train_local(two_rounds, loader, epochs=1, lr=0.01, device=cpu, optimizer_state=kept)
    assert kept["optimizer"] == "adam" and len(kept["parameters"]) == 4
    assert all(s["step"] == 4 for s in kept["state_dict"]["state"].values())
    train_local(two_rounds, loader, epochs=1, lr=0.01, device=cpu, optimizer_state=kept)
    assert all(s["step"] == 8 for s in kept["state_dict"]["state"].values())
    for a, b in zip(one_run.parameters(), two_rounds.parameters()):
        torch.testing.assert_close(a, b)
    # afresh each call (the default): a different result from the continued run
    fresh = _toy_model()
    for _ in range(2):
        train_local(fresh, loader, epochs=1, lr=0.01, device=cpu)
    assert not torch.equal(next(fresh.parameters()), next(two_rounds.parameters()))
    # the lr of the call is kept, not the one saved with the state
    model = _toy_model()
    optimizer = make_optimizer("adam", list(model.parameters()), lr=0.5)
    names = [n for n, _ in model.named_parameters()]
    assert restore_optimizer(optimizer, kept, "adam", names)
    assert [g["lr"] for g in optimizer.param_groups] == [0.5]
    assert optimizer.state_dict()["state"][0]["step"] == 8


def test_kept_optimizer_state_of_another_optimizer_or_parameters_starts_afresh(caplog):
    model = _toy_model()
    names = [n for n, _ in model.named_parameters()]
    sgd = make_optimizer("sgd", list(model.parameters()), lr=0.1)
    snapshot = optimizer_snapshot(sgd, "sgd", names)
    adam = make_optimizer("adam", list(model.parameters()), lr=0.1)
    assert not restore_optimizer(adam, snapshot, "adam", names, label="site-3")
    assert "site-3: the kept optimizer state is of sgd over 4 parameter tensors, this " \
        "round trains adam over 4" in caplog.text
    assert not restore_optimizer(sgd, snapshot, "sgd", names[:2])
    assert not restore_optimizer(sgd, {}, "sgd", names)
    assert adam.state_dict()["state"] == {}


def test_label_smoothing_keeps_the_model_from_full_confidence():
    # A separable task trained long: plain targets push the true class's probability to
    # about 1; smoothed targets (0.2 spread over 2 classes: the optimum is 0.9) hold it
    # below that, and the model still separates the classes.
    x = torch.randn(64, 4, 1, 1, generator=torch.Generator().manual_seed(5))
    y = (x[:, 0, 0, 0] > 0).long()
    loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    confidence, accuracy = {}, {}
    for smoothing in (0.0, 0.2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        train_local(model, loader, epochs=200, lr=0.05, device=torch.device("cpu"),
                    label_smoothing=smoothing)
        with torch.no_grad():
            probabilities = model(x).softmax(1)
        confidence[smoothing] = float(probabilities[torch.arange(64), y].median())
        accuracy[smoothing] = float((probabilities.argmax(1) == y).float().mean())
    assert confidence[0.0] > 0.98
    assert confidence[0.2] < 0.91
    assert accuracy[0.2] > 0.9


def test_logit_offsets_keep_a_site_from_pushing_down_classes_it_lacks():
    # Three classes, the site holds images of 0 and 1 only. Plain cross-entropy drives the
    # logit of class 2 down on every image (Adam: by about lr a step); with the absent
    # class's offset of the logit-adjusted loss, class 2 takes no part and its bias stays.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 4, 1, 1, generator=g)
    y = (x[:, 0, 0, 0] > 0).long()
    loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    moved = {}
    for name, offsets in (("plain", None),
                          ("adjusted", logit_offsets(torch.tensor([0.5, 0.5, 0.0]), 1.0))):
        torch.manual_seed(0)
        head = nn.Linear(4, 3)
        before = head.bias.detach().clone()
        train_local(nn.Sequential(nn.Flatten(), head), loader, epochs=5, lr=0.05,
                    device=torch.device("cpu"), logit_offsets=offsets)
        moved[name] = float(before[2] - head.bias.detach()[2])
    assert moved["plain"] > 0.5
    assert moved["adjusted"] == 0.0


def test_equal_local_steps_pass_over_a_small_site_again():
    small = _toy_loader(48)  # 3 batches of 16
    plain = train_local(_toy_model(), small, epochs=2, lr=0.01, device=torch.device("cpu"),
                        max_batches=7)
    assert plain.examples == 2 * 3 * 16  # a small site stops at the end of its images
    equal = train_local(_toy_model(), small, epochs=2, lr=0.01, device=torch.device("cpu"),
                        max_batches=7, equal_steps=True)
    assert equal.examples == 2 * 7 * 16  # as many steps as a large site
    large = train_local(_toy_model(), _toy_loader(256), epochs=1, lr=0.01,
                        device=torch.device("cpu"), max_batches=7, equal_steps=True)
    assert large.examples == 7 * 16  # a large site is still capped
    with pytest.raises(ValueError, match="loader is empty"):
        train_local(_toy_model(), [], epochs=1, lr=0.01, device=torch.device("cpu"),
                    max_batches=2, equal_steps=True)


def test_lr_follows_the_paper_step_schedule_across_rounds():
    assert [lr_for_round(1e-4, r, 10, 0.1) for r in (1, 10, 11, 20, 21)] == pytest.approx(
        [1e-4, 1e-4, 1e-5, 1e-5, 1e-6])


def test_confusion_matrix_counts_every_image():
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 3))
    cm, loss = confusion_matrix(model, _toy_loader(48), torch.device("cpu"), 3)
    assert cm.sum() == 48 and cm.shape == (3, 3) and loss > 0


def test_lr_steps_per_local_epoch_within_a_round():
    """StepLR over the local epochs of one round: with γ = 0 from the second epoch on,
    three epochs move the weights exactly as far as one."""
    def trained(epochs):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        data = [(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])) for _ in range(3)]
        train_local(model, data, epochs=epochs, lr=0.1, device=torch.device("cpu"),
                    lr_step_epochs=1, lr_gamma=0.0)
        return model[1].weight.detach().clone()

    assert torch.equal(trained(1), trained(3))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    before = model[1].weight.detach().clone()
    train_local(model, [(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0]))], epochs=2,
                lr=0.1, device=torch.device("cpu"), lr_step_epochs=1, lr_gamma=1.0)
    assert not torch.equal(before, model[1].weight)


def test_cosine_decay_starts_at_one_and_ends_near_zero_by_round_number():
    from client_app.training import cosine_factor

    factors = [cosine_factor(r, 12) for r in range(1, 13)]
    assert factors[0] == 1.0 and all(a > b for a, b in zip(factors, factors[1:]))
    assert 0 < factors[-1] < 0.02 and factors[6] == pytest.approx(0.5)
    assert cosine_factor(20, 12) == factors[-1]  # a resumed run past its end stays low


def test_frozen_bn_statistics_keep_running_stats_and_train_the_affine_weights():
    def model_with_bn():
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                             nn.Linear(144, 2))

    for frozen in (False, True):
        model = model_with_bn()
        bn = model[1]
        mean, weight = bn.running_mean.clone(), bn.weight.detach().clone()
        train_local(model, _toy_loader(), epochs=1, lr=0.01, device=torch.device("cpu"),
                    frozen_bn_statistics=frozen)
        assert torch.equal(bn.running_mean, mean) == frozen
        assert not torch.equal(bn.weight.detach(), weight)  # trained either way
