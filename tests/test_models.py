import torch

from edge_m2kd.models import IncrementalNet


def test_stage_outputs_and_heads():
    net = IncrementalNet("resnet32")
    net.add_classes(3)
    out = net(torch.randn(2, 3, 32, 32))
    assert out.logits.shape == (2, 3)
    assert [a.shape for a in out.aux_logits] == [(2, 3), (2, 3)]
    assert [f.shape[1] for f in net.backbone(torch.randn(1, 3, 32, 32))] == [16, 32, 64]


def test_resnet18_stages_and_small_stem():
    net = IncrementalNet("resnet18", small_input_stem=True)
    net.add_classes(2)
    feats = net.backbone(torch.randn(1, 3, 32, 32))
    assert [f.shape[1] for f in feats] == [64, 128, 256, 512]
    assert feats[0].shape[-1] == 32  # the small stem keeps full resolution
    assert len(net(torch.randn(1, 3, 32, 32)).aux_logits) == 3


def test_head_growth_keeps_old_rows():
    net = IncrementalNet("resnet20")
    net.add_classes(2)
    w, b = net.main_head.weight.detach().clone(), net.main_head.bias.detach().clone()
    aux_w = net.aux_heads[0].weight.detach().clone()
    net.add_classes(3)
    assert net.num_classes == 5
    assert torch.equal(net.main_head.weight[:2], w) and torch.equal(net.main_head.bias[:2], b)
    assert torch.equal(net.aux_heads[0].weight[:2], aux_w)
    assert not torch.equal(net.main_head.weight[2:], torch.zeros(3, 64))
