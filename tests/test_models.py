"""The ResNets: torchvision parity, placement, stems, widths, zero-init and virtual workers."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from normbench.models import (MODELS, BasicBlock, Bottleneck, ConvNormAct, build_model,
                              norm_input_shapes)
from normbench.norms import NormConfigError


def copy_torchvision_weights(ours: nn.Module, theirs: nn.Module) -> None:
    """Both register parameters and buffers in the same order; copy by position, check shapes."""
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert len(ours_sd) == len(theirs_sd)
    mapped = {}
    for (name, ours_t), (their_name, their_t) in zip(ours_sd.items(), theirs_sd.items()):
        assert ours_t.shape == their_t.shape, (name, their_name)
        mapped[name] = their_t
    ours.load_state_dict(mapped)


def test_resnet50_matches_torchvision_parameter_count_and_outputs():
    torch.manual_seed(0)
    ours = build_model("resnet50", num_classes=1000, norm="bn", placement="before",
                       stem="imagenet")
    assert sum(p.numel() for p in ours.parameters()) == 25_557_032
    theirs = torchvision.models.resnet50()
    with torch.no_grad():  # non-trivial running statistics, so eval mode is a real check
        for m in theirs.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    copy_torchvision_weights(ours, theirs)
    x = torch.randn(2, 3, 96, 96)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    ours.train(), theirs.train()
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_basic_resnets_match_torchvision(name):
    ours = build_model(name, num_classes=1000)
    theirs = getattr(torchvision.models, name)()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    copy_torchvision_weights(ours, theirs)
    x = torch.randn(2, 3, 64, 64)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


def unit_orders(model: nn.Module) -> dict[str, list[str]]:
    return {name: list(dict(m.named_children())) for name, m in model.named_modules()
            if isinstance(m, ConvNormAct)}


def test_placement_changes_the_module_order_as_defined():
    before = unit_orders(build_model("resnet50", num_classes=10, placement="before"))
    after = unit_orders(build_model("resnet50", num_classes=10, placement="after"))
    assert before.keys() == after.keys()
    for name in before:
        last_of_branch = name.endswith(".conv3") or name.endswith(".shortcut")
        if last_of_branch:  # no activation before the addition: conv -> norm in both
            assert before[name] == after[name] == ["conv", "norm"], name
        else:
            assert before[name] == ["conv", "norm", "act"], name
            assert after[name] == ["conv", "act", "norm"], name


def test_after_placement_computes_conv_act_norm():
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=10, norm="gn", norm_options={"groups": 4},
                        placement="after", stem="cifar").eval()
    unit = model.stem[0]
    x = torch.randn(2, 3, 8, 8)
    expected = F.group_norm(F.relu(F.conv2d(x, unit.conv.weight, padding=1)), 4,
                            unit.norm.weight, unit.norm.bias, 1e-5)
    torch.testing.assert_close(unit(x), expected)


def test_no_norm_after_the_residual_addition():
    # A block's output is act(branch + shortcut): its last child module is the activation.
    model = build_model("resnet50", num_classes=10, placement="after")
    for m in model.modules():
        if isinstance(m, (BasicBlock, Bottleneck)):
            assert isinstance(m.act, nn.ReLU)
            assert not hasattr(m.act, "values_per_statistic")


@pytest.mark.parametrize("depth", [8, 20, 32, 44, 56, 110])
def test_cifar_resnets_have_the_papers_depth(depth):
    model = build_model(f"resnet{depth}", num_classes=10, stem="cifar")
    main_path_convs = [n for n, m in model.named_modules()
                       if isinstance(m, nn.Conv2d) and ".shortcut" not in n]
    assert len(main_path_convs) + 1 == depth  # + the classifier
    widths = [s[0].conv1.conv.out_channels for s in model.stages]
    assert widths == [16, 32, 64]


def test_resnet20_parameter_count_with_projection_shortcuts():
    # 0.27M in He et al. 2016 (option A shortcuts); projections add two 1x1 convs and norms.
    params = sum(p.numel() for p in build_model("resnet20", num_classes=10,
                                                stem="cifar").parameters())
    assert 270_000 < params < 275_000


def test_stems_and_map_sizes():
    with torch.device("meta"):
        cifar = build_model("resnet50", num_classes=10, stem="cifar")
        imagenet = build_model("resnet50", num_classes=10, stem="imagenet")
    cifar_shapes, imagenet_shapes = norm_input_shapes(cifar, 32), norm_input_shapes(imagenet, 32)
    assert cifar_shapes["stem.0.norm"] == (64, 32, 32)
    assert cifar_shapes["stages.3.2.conv3.norm"] == (2048, 4, 4)
    assert imagenet_shapes["stem.0.norm"] == (64, 16, 16)
    assert imagenet_shapes["stages.3.2.conv3.norm"] == (2048, 1, 1)  # why CIFAR needs its stem
    assert not any(isinstance(m, nn.MaxPool2d) for m in cifar.modules())


def test_width_multiplier_scales_every_stage():
    model = build_model("resnet18", num_classes=10, width=0.5)
    assert model.stem[0].conv.out_channels == 32
    assert [s[0].conv1.conv.out_channels for s in model.stages] == [32, 64, 128, 256]
    assert model.fc.in_features == 256


def test_last_norm_of_each_branch_starts_at_zero_and_can_be_switched_off():
    model = build_model("resnet50", num_classes=10)
    for m in model.modules():
        if isinstance(m, Bottleneck):
            assert torch.all(m.conv3.norm.weight == 0)
            assert torch.all(m.conv1.norm.weight == 1) and torch.all(m.conv2.norm.weight == 1)
            assert torch.all(m.conv3.norm.bias == 0)
    assert torch.all(model.stem[0].norm.weight == 1)
    plain = build_model("resnet50", num_classes=10, zero_init_last=False)
    assert all(torch.all(m.conv3.norm.weight == 1) for m in plain.modules()
               if isinstance(m, Bottleneck))


def test_virtual_workers_model_step_equals_separate_workers():
    """One step over W*B images with per-chunk BN = W workers with unsynchronized BN: same
    outputs, same mean loss, and the gradient is the average of the workers' gradients."""
    torch.manual_seed(0)
    workers, batch = 4, 2
    virtual = build_model("resnet8", num_classes=10, stem="cifar", batch=batch).double()
    plain = build_model("resnet8", num_classes=10, stem="cifar", batch=None).double()
    plain.load_state_dict(virtual.state_dict())
    x = torch.randn(workers * batch, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 10, (workers * batch,))
    logits = virtual(x)
    loss = F.cross_entropy(logits, y)
    grads = torch.autograd.grad(loss, list(virtual.parameters()))
    worker_logits, worker_grads = [], []
    for k in range(workers):
        chunk = slice(k * batch, (k + 1) * batch)
        out = plain(x[chunk])
        worker_logits.append(out)
        worker_grads.append(torch.autograd.grad(F.cross_entropy(out, y[chunk]),
                                                list(plain.parameters())))
    torch.testing.assert_close(logits, torch.cat(worker_logits))
    torch.testing.assert_close(loss, F.cross_entropy(torch.cat(worker_logits), y))
    for g, *per_worker in zip(grads, *worker_grads):
        torch.testing.assert_close(g, sum(per_worker) / workers)


def test_gn_error_names_the_layer():
    with pytest.raises(NormConfigError, match="at layer stem: gn: groups=32 does not divide 16"):
        build_model("resnet20", num_classes=10, norm="gn", norm_options={"groups": 32})


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(NormConfigError, match="unknown model 'resnet51'.*resnet50"):
        build_model("resnet51", num_classes=10)
    assert {"resnet18", "resnet34", "resnet50", "resnet20", "resnet32", "resnet44", "resnet56",
            "resnet110"} <= set(MODELS)


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "prelu", "silu", "gelu", "tanh",
                                 "sigmoid"])
def test_every_activation_trains(act):
    model = build_model("resnet8", num_classes=10, act=act, stem="cifar")
    out = model(torch.randn(2, 3, 8, 8))
    out.sum().backward()
    assert torch.isfinite(out).all()
