"""Plain Daft baseline: daft.read_video_frames(224x224, sample_interval_seconds=1.0) ->
class-based batch UDF (@daft.cls, use_process=True) doing ImageNet normalize + torchvision resnet18 on CPU -> argmax.

Workaround vs the most naive script (the frames' Image column handed to the UDF as is): Daft 0.7.26 runs UDFs
in-thread (ignoring use_process=True) when the input column is an Image/Tensor extension type,
and the in-thread torch UDF deadlocked (GIL) on the full film. So the Image column is cast to a
FixedSizeList[uint8; 224*224*3] (a plain Arrow type), which lets the UDF run in worker processes,
and the UDF reshapes it back to N x 224 x 224 x 3 with numpy (zero-copy from Arrow).

What a user would write instead of vidpipe, from Daft's docs; measured beside ``vidpipe bench`` (README,
Performance).  Needs ``pip install daft==0.7.26 av torchvision`` in a venv of its own; run:
``python jobs/baselines/daft_plain.py FILM.mp4 DURATION_S``."""
import sys
import time

import daft
import numpy as np
from daft import DataType

PATH = sys.argv[1] if len(sys.argv) > 1 else "/root/.cache/vidpipe/media/bbb_film.mp4"
DUR = float(sys.argv[2]) if len(sys.argv) > 2 else 596.5
BATCH = 32
H = W = 224


@daft.cls(use_process=True)
class ResNet:
    def __init__(self):
        import torch
        import torchvision
        self.torch = torch
        self.m = torchvision.models.resnet18(weights=None).eval()
        self.mean = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(1, 3, 1, 1)
        self.std = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(1, 3, 1, 1)

    @daft.method.batch(return_dtype=DataType.int64(), batch_size=BATCH)
    def predict(self, images: daft.Series):
        torch = self.torch
        arr = images.to_arrow()
        x = np.asarray(arr.values.to_numpy(zero_copy_only=False)).reshape(len(arr), H, W, 3)
        x = x.astype(np.float32) / 255.0
        x = (x.transpose(0, 3, 1, 2) - self.mean) / self.std
        with torch.inference_mode():
            out = self.m(torch.from_numpy(np.ascontiguousarray(x)))
        return out.argmax(dim=1).numpy().astype(np.int64)


def main():
    t0 = time.perf_counter()
    df = daft.read_video_frames(PATH, image_height=H, image_width=W, sample_interval_seconds=1.0)
    df = df.with_column("flat", df["data"].cast(DataType.fixed_size_list(DataType.uint8(), H * W * 3)))
    model = ResNet()
    df = df.select("frame_time", model.predict(df["flat"]).alias("pred"))
    df = df.collect()
    wall = time.perf_counter() - t0
    n = len(df)
    print(f"RESULT daft wall_s={wall:.2f} video_s_per_s={DUR / wall:.2f} frames={n}", flush=True)


if __name__ == "__main__":
    main()
