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


def test_feature_offset_is_measured_and_mirrors_with_flips() -> None:
    from oncolens.training.export import ExportModel

    torch.manual_seed(0)
    model = Classifier(build_backbone("efficientnet-lite0", pretrained=True), 3).eval()
    # Symmetric padding in five stride-2 layers puts cells up to (32/2 - 0.5) = 15.5 px up-left of
    # the even grid; the ImageNet kernels (trained with other padding) move that, hence measuring.
    dy, dx = ExportModel(model, ("identity",)).feature_offset(128, samples=2)
    assert -20 < dy < -8 and -20 < dx < 0
    # Averaging with the mirrored view cancels the horizontal shift, not the vertical one.
    dy_h, dx_h = ExportModel(model, ("identity", "hflip")).feature_offset(128, samples=2)
    assert -20 < dy_h < -8 and abs(dx_h) < 3
