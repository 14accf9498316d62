import pytest

torch = pytest.importorskip("torch")

from oncolens.training.backbones import BACKBONES, Classifier, build_backbone  # noqa: E402


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_imagenet_weights_load_with_no_missing_keys(name: str) -> None:
    # build_backbone raises if any key is missing or unexpected; check a loaded value is not the init.
    model = build_backbone(name, pretrained=True)
    fresh = build_backbone(name, pretrained=False)
    assert not torch.equal(model._conv_stem.weight, fresh._conv_stem.weight)
    assert model._bn1.running_var.mean().item() != 1.0


def test_classifier_returns_logits_and_stride_32_features() -> None:
    model = Classifier(build_backbone("efficientnet-lite0", pretrained=False), 5).eval()
    logits, features = model(torch.zeros(2, 3, 96, 96))
    assert logits.shape == (2, 5)
    assert features.shape == (2, 1280, 3, 3)
    # logits are exactly the linear head on the pooled features (what makes the CAM exact)
    assert torch.allclose(logits, model.head(features.mean(dim=(2, 3))), atol=1e-5)


def test_unknown_backbone_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'resnet50'"):
        build_backbone("resnet50")


def test_feature_offset_follows_the_padding_geometry_and_mirrors_with_flips() -> None:
    from oncolens.training.export import ExportModel

    model = Classifier(build_backbone("efficientnet-lite0", pretrained=False), 3).eval()
    # Five stride-2 layers with symmetric padding: cells sit (32/2 - 0.5) = 15.5 px up-left of the grid.
    assert ExportModel(model, ("identity",)).feature_offset(224) == (-15.5, -15.5)
    assert ExportModel(model, ("identity", "hflip")).feature_offset(224) == (-15.5, 0.0)
    assert ExportModel(model, ("identity", "hflip", "vflip")).feature_offset(192) == pytest.approx((-15.5 / 3,) * 2)


def test_the_frozen_front_in_bf16_is_close_to_fp32_and_gives_fp32_maps_without_gradients() -> None:
    from oncolens.training.backbones import frozen_front

    torch.manual_seed(0)
    model = Classifier(build_backbone("efficientnet-lite0", pretrained=True), 3).eval()
    x = torch.randn(4, 3, 96, 96, requires_grad=True)
    exact = frozen_front(model, x, 5, "fp32")
    fast = frozen_front(model, x, 5, "bf16")
    assert exact.dtype == fast.dtype == torch.float32
    assert not exact.requires_grad and not fast.requires_grad
    assert exact.is_contiguous(memory_format=torch.channels_last)
    plain = model.backbone.front(x, 5).detach()  # fp32: the plain front (up to the memory layout's rounding)
    assert torch.allclose(exact, plain, rtol=1e-4, atol=1e-4)
    # bf16 keeps 8 bits of mantissa: after 5 blocks the maps differ by a few percent, not more
    relative = (fast - exact).norm() / exact.norm()
    assert 0 < relative.item() < 0.05


def test_an_unknown_front_precision_is_refused() -> None:
    from oncolens.training.recipe import RecipeError, TrainConfig

    assert TrainConfig(front_precision="bf16").front_precision == "bf16"
    with pytest.raises(RecipeError, match=r"front_precision 'fp16' is not one of \('fp32', 'bf16'\)"):
        TrainConfig(front_precision="fp16")
